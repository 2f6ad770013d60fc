from django.contrib import admin

from mistudio.admin import TrackedRowAdmin

from . import services
from .models import Dataset, Extraction, ExtractionTemplate


@admin.register(Dataset)
class DatasetAdmin(TrackedRowAdmin):
    list_display = ("id", "name", "source", "row_count", "text_column", "status", "owner", "created_at")
    list_filter = ("source", "status", "owner")
    search_fields = ("id", "name", "repo_id")
    readonly_fields = [f.name for f in Dataset._meta.fields if f.name not in ("name", "encrypted_token")]
    exclude = ("encrypted_token",)
    delete_service = staticmethod(services.delete_dataset)


@admin.register(Extraction)
class ExtractionAdmin(TrackedRowAdmin):
    list_display = ("id", "model", "dataset", "status", "progress_shown", "samples_done", "dtype", "owner", "created_at")
    list_filter = ("status", "dtype", "tokenization", "owner")
    search_fields = ("id", "model__name", "dataset__name")
    readonly_fields = [f.name for f in Extraction._meta.fields]
    delete_service = staticmethod(services.delete_extraction)


@admin.register(ExtractionTemplate)
class ExtractionTemplateAdmin(admin.ModelAdmin):
    """Templates are made from the dialog, the API or the command, where the request is
    validated against a model: here they can be renamed, favourited or deleted."""

    list_display = ("id", "name", "favourite", "owner", "updated_at")
    list_filter = ("favourite", "owner")
    search_fields = ("id", "name")
    readonly_fields = ("id", "owner", "request", "created_at", "updated_at")

    def has_add_permission(self, request):
        return False
