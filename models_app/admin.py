from django.contrib import admin

from mistudio.admin import TrackedRowAdmin

from . import services
from .models import Model

PROGRESS_FIELDS = (
    "status", "progress", "bytes_done", "bytes_total", "speed_bps", "eta_seconds", "error_code",
    "error_message", "suggested_format", "job_id", "revision", "params_count", "architecture",
    "memory_required_bytes", "disk_size_bytes", "file_path", "quantized_path", "owner", "created_at", "updated_at",
)  # fmt: skip


@admin.register(Model)
class ModelAdmin(TrackedRowAdmin):
    list_display = ("id", "name", "repo_id", "architecture", "params_shown", "quantization", "status", "progress_shown",
                    "owner", "created_at")  # fmt: skip
    list_filter = ("status", "architecture", "quantization", "source", "owner")
    search_fields = ("id", "name", "repo_id", "architecture")
    readonly_fields = ("id",) + PROGRESS_FIELDS
    exclude = ("encrypted_token",)
    delete_service = staticmethod(services.delete_model)

    @admin.display(description="params", ordering="params_count")
    def params_shown(self, row) -> str:
        from mistudio.templatetags.ui import params

        return params(row.params_count) if row.params_count else "—"
