from functools import cache


@cache
def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "CPU"


def compute_device(request):
    return {"compute_device": _device_name()}


def tabs(request):
    return {"tabs": [("models", "/"), ("datasets", "/datasets/"), ("extractions", "/extractions/")]}
