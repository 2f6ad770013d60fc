from django.contrib import admin, messages

from . import services
from .models import Model

PROGRESS_FIELDS = (
    "status", "progress", "bytes_done", "bytes_total", "speed_bps", "eta_seconds", "error_code",
    "error_message", "suggested_format", "job_id", "revision", "params_count", "architecture",
    "memory_required_bytes", "disk_size_bytes", "file_path", "quantized_path", "created_at", "updated_at",
)  # fmt: skip


@admin.register(Model)
class ModelAdmin(admin.ModelAdmin):
    list_display = ("id", "name", "repo_id", "architecture", "params_count", "quantization", "status", "progress", "created_at")
    list_filter = ("status", "architecture", "quantization", "source")
    search_fields = ("id", "name", "repo_id", "architecture")
    readonly_fields = ("id",) + PROGRESS_FIELDS
    exclude = ("encrypted_token",)
    actions = ["delete_with_files"]

    def has_delete_permission(self, request, obj=None):
        # Deleting must also remove files and refuse running jobs: use the action below.
        return False

    @admin.action(description="Delete selected models and their files")
    def delete_with_files(self, request, queryset):
        for model in queryset:
            try:
                services.delete_model(model.id)
            except services.Conflict as exc:
                self.message_user(request, exc.message, messages.WARNING)
