"""What the model commands add to the shared job command: transfer figures beside the
bar, and the one-line summary of a finished model."""

from mistudio.commands import JobCommand, eta_text
from mistudio.hub import format_bytes
from models_app.models import Model


class ModelCommand(JobCommand):
    follow_hint = "; follow it with `manage.py list_models`"

    def progress_detail(self, model: Model) -> str:
        if model.shows_transfer:
            return (f"{format_bytes(model.bytes_done)}/{format_bytes(model.bytes_total)}  {model.speed_mbps:.1f} MB/s  "
                    f"ETA {eta_text(model.eta_seconds)}")  # fmt: skip
        return ""

    def describe(self, model: Model) -> str:
        return describe(model)


def describe(model: Model) -> str:
    parts = [model.id, model.status, model.name, model.quantization]
    if model.params_count:
        parts.append(f"{model.params_count:,} params")
    if model.memory_required_bytes:
        parts.append(f"{format_bytes(model.memory_required_bytes)} memory")
    if model.disk_size_bytes:
        parts.append(f"{format_bytes(model.disk_size_bytes)} on disk")
    return "  ".join(parts)
