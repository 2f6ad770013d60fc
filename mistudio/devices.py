"""Where a model runs and how much memory it may take there (Django-free: the ml packages
and the worker both ask it).

A worker's main process forks a work horse per job, and CUDA cannot be used in a child
forked from a process that initialized it: so the worker asks the driver (NVML, else
nvidia-smi) for its reports, and only a job itself calls into torch.cuda."""

from __future__ import annotations

import platform
import shutil
import subprocess


def compute_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"  # asks the driver; CUDA stays uninitialized


def device_class(device: str) -> str:
    """The queue a worker on this device serves unless MISTUDIO_WORKER_CLASS names another."""
    return "gpu" if device == "cuda" else "cpu"


def device_name(device: str, fork_safe: bool = False) -> str:
    if device == "cuda":
        if fork_safe:
            return _driver_query("name") or "CUDA GPU"
        import torch

        return torch.cuda.get_device_name(0)
    return platform.processor() or platform.machine() or "CPU"


def memory_budget(limit_bytes: int | None, device: str, fork_safe: bool = False) -> int:
    """The memory a model may use: the configured limit, else what the device has free."""
    if limit_bytes:
        return limit_bytes
    if device == "cuda":
        if fork_safe:
            free = _driver_query("memory.free")
            return int(float(free) * 2**20) if free else 0
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def _driver_query(field: str) -> str | None:
    """GPU 0's `field` from the driver, without initializing CUDA in this process."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            if field == "name":
                name = pynvml.nvmlDeviceGetName(handle)
                return name.decode() if isinstance(name, bytes) else name
            return str(pynvml.nvmlDeviceGetMemoryInfo(handle).free / 2**20)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML bindings: ask nvidia-smi instead
        pass
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    try:
        out = subprocess.run([tool, f"--query-gpu={field}", "--format=csv,noheader,nounits", "--id=0"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None
