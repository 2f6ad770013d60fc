from django.contrib import admin

from .models import Dataset, Extraction


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    list_display = ("id", "name", "source", "row_count", "text_column", "status", "created_at")
    list_filter = ("source", "status")
    search_fields = ("id", "name")
    readonly_fields = ("id", "file_path", "row_count", "preview", "created_at")


@admin.register(Extraction)
class ExtractionAdmin(admin.ModelAdmin):
    list_display = ("id", "model", "dataset", "status", "progress", "samples_done", "dtype", "created_at")
    list_filter = ("status", "dtype", "tokenization")
    search_fields = ("id", "model__name", "dataset__name")
    readonly_fields = [f.name for f in Extraction._meta.fields]
