import secrets

from django.conf import settings
from django.db import models

from models_app.models import Model


def new_dataset_id() -> str:
    return f"ds_{secrets.token_hex(6)}"


def new_extraction_id() -> str:
    return f"ext_{secrets.token_hex(6)}"


class Dataset(models.Model):
    """A text corpus to extract over, stored under datasets/{id}/."""

    SOURCES = [("upload", "Upload"), ("local", "Local file"), ("hub", "Hub dataset repo")]
    STATUSES = [("ready", "ready"), ("error", "error")]

    id = models.CharField(primary_key=True, max_length=16, default=new_dataset_id, editable=False)
    name = models.CharField(max_length=200)
    source = models.CharField(max_length=8, choices=SOURCES)
    file_path = models.CharField(max_length=1000)
    text_column = models.CharField(max_length=100, default="text")
    row_count = models.IntegerField(default=0)
    preview = models.JSONField(default=list, blank=True)
    status = models.CharField(max_length=8, choices=STATUSES, default="ready")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.row_count} rows)"

    @property
    def folder(self):
        return settings.DATA_DIR / "datasets" / self.id

    def as_dict(self) -> dict:
        return {
            "id": self.id, "name": self.name, "source": self.source, "text_column": self.text_column,
            "row_count": self.row_count, "preview": self.preview, "status": self.status,
            "created_at": self.created_at.isoformat() if self.created_at else None,
        }  # fmt: skip


class ExtractionStatus(models.TextChoices):
    QUEUED = "queued"
    LOADING = "loading"
    EXTRACTING = "extracting"
    SAVING = "saving"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


EXTRACTION_RUNNING = (ExtractionStatus.QUEUED, ExtractionStatus.LOADING, ExtractionStatus.EXTRACTING, ExtractionStatus.SAVING)


class Extraction(models.Model):
    id = models.CharField(primary_key=True, max_length=16, default=new_extraction_id, editable=False)
    # Deleting a model or dataset keeps finished extractions (hours of compute, described by
    # their metadata.json); a running one blocks the delete (409).
    model = models.ForeignKey(Model, null=True, on_delete=models.SET_NULL, related_name="extractions")
    dataset = models.ForeignKey(Dataset, null=True, on_delete=models.SET_NULL, related_name="extractions")
    layers = models.JSONField()
    hook_types = models.JSONField()
    batch_size = models.IntegerField()
    max_samples = models.IntegerField()
    seq_len = models.IntegerField()
    dtype = models.CharField(max_length=8, default="float16")
    tokenization = models.CharField(max_length=8, default="packed")
    status = models.CharField(max_length=12, choices=ExtractionStatus.choices, default=ExtractionStatus.QUEUED)
    progress = models.FloatField(default=0.0)
    samples_done = models.IntegerField(default=0)
    samples_total = models.IntegerField(default=0)
    samples_per_second = models.FloatField(default=0.0)
    eta_seconds = models.FloatField(null=True, blank=True)
    output_path = models.CharField(max_length=1000, blank=True)
    statistics = models.JSONField(default=dict, blank=True)
    error_code = models.CharField(max_length=40, blank=True)
    error_message = models.TextField(blank=True)
    job_id = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.id} ({self.status})"

    @property
    def is_running(self) -> bool:
        return self.status in EXTRACTION_RUNNING

    @property
    def final_dir(self):
        return settings.DATA_DIR / "activations" / f"extraction_{self.id}"

    def as_dict(self) -> dict:
        return {
            "id": self.id, "model_id": self.model_id, "dataset_id": self.dataset_id, "layers": self.layers,
            "hook_types": self.hook_types, "batch_size": self.batch_size, "max_samples": self.max_samples,
            "seq_len": self.seq_len, "dtype": self.dtype, "tokenization": self.tokenization, "status": self.status,
            "progress": round(self.progress, 2), "samples_processed": self.samples_done,
            "samples_total": self.samples_total, "samples_per_second": round(self.samples_per_second, 3),
            "eta_seconds": self.eta_seconds, "output_path": self.output_path or None, "statistics": self.statistics,
            "error_code": self.error_code or None, "error_message": self.error_message or None,
            "created_at": self.created_at.isoformat() if self.created_at else None,
        }  # fmt: skip
