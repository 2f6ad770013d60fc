import os
import secrets
from pathlib import Path

from django.conf import settings
from django.db import models
from django.template.loader import render_to_string

from mistudio import progress
from mistudio.errors import Conflict, JobError, ServiceError
from mistudio.filters import filtered_page
from mistudio.jobs import TrackedRow, TransferRow
from mistudio.staging import staged_path

from .ml.extract import ExtractionSpec
from .ml.writer import read_checkpoint


def new_dataset_id() -> str:
    return f"ds_{secrets.token_hex(6)}"


def new_extraction_id() -> str:
    return f"ext_{secrets.token_hex(6)}"


class DatasetStatus(models.TextChoices):
    QUEUED = "queued"
    DOWNLOADING = "downloading"
    READY = "ready"
    ERROR = "error"
    CANCELLED = "cancelled"


DATASET_RUNNING = (DatasetStatus.QUEUED, DatasetStatus.DOWNLOADING)


class Dataset(TransferRow):
    """A text corpus to extract over, stored under datasets/{id}/. An upload or a local
    file is ready at once; a Hub dataset is imported by a job, like a model download."""

    KIND = "dataset"
    QUEUED, DONE, FAILED, CANCELLED = DatasetStatus.QUEUED, DatasetStatus.READY, DatasetStatus.ERROR, DatasetStatus.CANCELLED
    RUNNING = DATASET_RUNNING
    card_template = "activations_app/_dataset_card.html"
    html_group = progress.DATASETS_GROUP
    SOURCES = [("upload", "Upload"), ("local", "Local file"), ("hub", "Hub dataset repo")]

    id = models.CharField(primary_key=True, max_length=16, default=new_dataset_id, editable=False)
    name = models.CharField(max_length=200)
    source = models.CharField(max_length=8, choices=SOURCES)
    file_path = models.CharField(max_length=1000)
    text_column = models.CharField(max_length=100, default="text")
    row_count = models.IntegerField(default=0, null=True)  # None: not known until read whole (a streamed jsonl)
    preview = models.JSONField(default=list, blank=True)
    statistics = models.JSONField(default=dict, blank=True, help_text="Rows, characters and (for one model's "
                                  "tokenizer) tokens per row, over the whole dataset or the share said.")  # fmt: skip
    status = models.CharField(max_length=12, choices=DatasetStatus.choices, default=DatasetStatus.READY)
    # A Hub dataset: what was asked for, and the commit it resolved to.
    repo_id = models.CharField(max_length=200, blank=True)
    split = models.CharField(max_length=100, blank=True)
    requested_revision = models.CharField(max_length=200, blank=True)
    revision = models.CharField(max_length=200, blank=True)
    config = models.CharField(max_length=100, blank=True)  # the subset (a folder of the repo), when it has several
    # "stream": the files stay on the Hub and an extraction reads only the rows it needs
    # (parquet row groups, jsonl blocks, over HTTP Range); "local": downloaded whole.
    storage = models.CharField(max_length=8, default="local")
    files = models.JSONField(default=list, blank=True)  # a streamed split's files, in order

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({'uncounted' if self.row_count is None else self.row_count} rows)"

    @property
    def folder(self):
        return settings.DATA_DIR / "datasets" / self.id

    def job_paths(self) -> list:
        return [self.folder, staged_path(self.folder)]

    @property
    def download_target(self):
        return self.folder

    job_function = "activations_app.jobs.import_dataset_job"

    def progress_event(self) -> dict:
        return {
            "type": "dataset_progress", "dataset_id": self.id, "status": self.status, "progress": round(self.progress, 2),
            "bytes_done": self.bytes_done, "bytes_total": self.bytes_total, "speed_mbps": self.speed_mbps,
            "eta_seconds": self.eta_seconds, "row_count": self.row_count, "error": self.error_message or None,
        }  # fmt: skip

    def publish_added(self) -> None:
        progress.publish_html(Dataset.list_html(oob=True), self.html_group)

    def publish_removed(self) -> None:
        progress.publish_html(f'<div id="dataset-{self.id}" hx-swap-oob="delete"></div>', self.html_group)

    def stream_refusal(self, reader_id) -> str | None:
        """Why user `reader_id` may not stream this dataset: it is read from the Hub with the
        token its owner gave (a gated repo), and a token is never used on anyone else's
        behalf. None when they may (its owner, staff's shell jobs with no owner, or a
        dataset that needs no token)."""
        if self.storage != "stream" or not self.encrypted_token or reader_id == self.owner_id:
            return None  # no token needed, or the reader is its owner (None: the operator at the shell, for a shell import)
        return (f"{self.name} is streamed from a gated Hub repo with the access token of the user who imported it, "
                f"which is not used for anyone else; import {self.repo_id} yourself with your own token.")  # fmt: skip

    def texts(self, reader_id=None):
        """Its rows, in order: from the stored file(s), or streamed from the Hub as read, with
        the token of the reader when it is theirs (see stream_refusal)."""
        from mistudio.hub_access import stored_token

        from .ml import datasets as dataset_files
        from .ml.hub_datasets import stream_texts

        if self.storage == "stream":
            refusal = self.stream_refusal(reader_id)
            if refusal:
                raise JobError("gated_token_required", refusal)
            return stream_texts(self.repo_id, self.revision, list(self.files), self.text_column,
                                stored_token(self.encrypted_token), settings.HF_ENDPOINT)  # fmt: skip
        return dataset_files.iter_texts(Path(self.file_path), self.text_column)

    @property
    def statistics_shown(self) -> dict:
        """`statistics` as the page shows it: a measurement whose job ended without recording
        its outcome (its worker killed) says so, instead of "measuring…" for ever."""
        from mistudio.queue import side_job_stopped

        stats = self.statistics or {}
        asked = stats.get("asked") or {}
        if stats.get("state") == "computing" and side_job_stopped(asked.get("job_id"), asked.get("at")):
            return {**stats, "state": "failed", "error": "its job stopped before it finished (the worker stopped); measure again."}
        return stats

    @property
    def histograms(self) -> list[dict]:
        """The stored histograms (tokens per row when measured, else characters) as bars for
        the page: each bin's range, count and height (% of the tallest)."""
        stats = self.statistics or {}
        shown = []
        for kind, label in (("tokens", "tokens"), ("chars", "characters")):
            summary = stats.get(kind) or {}
            histogram = summary.get("histogram") or {}
            counts, edges = histogram.get("counts") or [], histogram.get("edges") or []
            if not counts or shown:
                continue
            tallest = max(counts) or 1
            shown.append({"label": label, "summary": summary, "bars": [
                {"low": edges[i], "high": edges[i + 1], "count": count, "height": round(100 * count / tallest, 1)}
                for i, count in enumerate(counts)]})  # fmt: skip
        return shown

    @staticmethod
    def statistics_record(rows: int, complete: bool, chars: dict | None, tokens: dict | None = None, model=None) -> dict:
        """What `statistics` holds once measured: over how many rows (every one, or the
        first ones of a streamed split), characters and tokens per row, and whose tokenizer."""
        from django.utils import timezone

        return {"state": "ready", "rows": rows, "complete": complete, "chars": chars, "tokens": tokens,
                "model_id": model.id if model else None, "model_label": f"{model.name} {model.quantization}" if model else None,
                "computed_at": timezone.now().isoformat()}  # fmt: skip

    def source_fingerprint(self) -> list:
        """What identifies its content: the Hub commit and files, or the stored files' sizes and times."""
        if self.storage == "stream":
            return [self.repo_id, self.revision, list(self.files)]
        source = Path(self.file_path)
        files = sorted(source.rglob("*")) if source.is_dir() else [source]
        return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file()]

    def extraction_ids(self) -> list[str]:
        """Its extractions' ids, newest first (the delete confirm names those that stay)."""
        return list(self.extractions.values_list("id", flat=True))

    def delete_blocker(self) -> str | None:
        if any(extraction.is_running for extraction in self.extractions.all()):
            return f"An extraction is using {self.name}; cancel it first."
        return None

    PANEL_SIZE = 20  # cards per page (the rest load on demand)

    @classmethod
    def panel_page(cls, page: int = 1, filters=None) -> dict:
        """One page of cards (newest first, or as `filters`, a DatasetFilters, narrow and
        order them), whether another follows, and the counts the page shows."""
        from .forms import DatasetFilters

        return filtered_page(cls.objects.all(), filters if filters is not None else DatasetFilters({}), page, cls.PANEL_SIZE, "datasets")

    @classmethod
    def list_html(cls, oob: bool = False, filters=None) -> str:
        return render_to_string("activations_app/_dataset_list.html", {**cls.panel_page(filters=filters), "oob": oob})

    def as_dict(self) -> dict:
        return {
            "id": self.id, "name": self.name, "source": self.source, "text_column": self.text_column,
            "row_count": self.row_count, "preview": self.preview, "status": self.status,
            "statistics": self.statistics or None,
            "repo_id": self.repo_id or None, "split": self.split or None, "revision": self.revision or None,
            "config": self.config or None, "storage": self.storage, "files": self.files,
            "progress": round(self.progress, 2), "bytes_done": self.bytes_done, "bytes_total": self.bytes_total,
            "error_code": self.error_code or None, "error_message": self.error_message or None, "notice": self.notice or None,
            "attempt": self.attempt,
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


class Extraction(TrackedRow):
    """One run of a model over a dataset; its request is an ExtractionSpec (`spec`)."""

    KIND = "extraction"
    QUEUED, DONE, FAILED, CANCELLED = (ExtractionStatus.QUEUED, ExtractionStatus.COMPLETED, ExtractionStatus.FAILED,
                                       ExtractionStatus.CANCELLED)  # fmt: skip
    RUNNING = EXTRACTION_RUNNING
    TIMEOUT_HINT = "use fewer samples or raise the limit"
    card_template = "activations_app/_extraction_card.html"
    html_group = progress.EXTRACTIONS_GROUP

    id = models.CharField(primary_key=True, max_length=16, default=new_extraction_id, editable=False)
    # Deleting a model or dataset keeps finished extractions (hours of compute, described by
    # their metadata.json); a running one blocks the delete (409).
    model = models.ForeignKey("models_app.Model", null=True, on_delete=models.SET_NULL, related_name="extractions")
    dataset = models.ForeignKey(Dataset, null=True, on_delete=models.SET_NULL, related_name="extractions")
    layers = models.JSONField()
    hook_types = models.JSONField()
    batch_size = models.IntegerField()
    max_samples = models.IntegerField()
    seq_len = models.IntegerField()
    dtype = models.CharField(max_length=8, default="float16")
    tokenization = models.CharField(max_length=8, default="packed")
    prepend_bos = models.CharField(max_length=8, default="always")
    separator = models.CharField(max_length=8, default="bos")  # rows made before it existed were joined with EOS
    outlier_factor = models.IntegerField(default=10)
    # What the model and dataset were, kept when either is deleted (the card of an orphan
    # still says what it was made from): "repo@revision format" and the dataset's name.
    model_label = models.CharField(max_length=300, blank=True)
    dataset_label = models.CharField(max_length=300, blank=True)
    outliers = models.CharField(max_length=8, default="keep")  # or "exclude"
    status = models.CharField(max_length=12, choices=ExtractionStatus.choices, default=ExtractionStatus.QUEUED)
    samples_done = models.IntegerField(default=0)
    samples_total = models.IntegerField(default=0)
    samples_per_second = models.FloatField(default=0.0)
    output_path = models.CharField(max_length=1000, blank=True)
    statistics = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.id} ({self.status})"

    @classmethod
    def rows(cls):
        return cls.objects.select_related("model", "dataset")

    @property
    def spec(self) -> ExtractionSpec:
        """The request as validated: what the job runs."""
        return ExtractionSpec(**{name: getattr(self, name) for name in ExtractionSpec.request_fields()})

    @property
    def final_dir(self):
        return settings.DATA_DIR / "activations" / f"extraction_{self.id}"

    @staticmethod
    def labels_for(model, dataset) -> dict:
        """model_label and dataset_label for a new row."""
        revision = (model.revision or "")[:7]
        name = model.repo_id or model.name
        return {"model_label": f"{name}{'@' + revision if revision else ''} {model.quantization}"[:300],
                "dataset_label": (dataset.name or dataset.id)[:300]}  # fmt: skip

    # What must be the same for another extraction's files to be this request's (the rows
    # themselves are compared too, before anything is taken: see ml.reuse).
    SAME_ROWS = ("seq_len", "tokenization", "prepend_bos", "separator", "dtype")

    @classmethod
    def reuse_sources(cls, model_id, dataset_id, spec: ExtractionSpec, exclude: str | None = None):
        """Finished extractions of the same model files and dataset, made with the same
        tokenization, sequence length, BOS policy, separator and dtype: where a request's
        files may already be. Newest first."""
        if model_id is None or dataset_id is None:
            return cls.objects.none()
        same = {name: getattr(spec, name) for name in cls.SAME_ROWS}
        return cls.objects.filter(status=ExtractionStatus.COMPLETED, model_id=model_id, dataset_id=dataset_id, **same).exclude(pk=exclude)

    job_function = "activations_app.jobs.extraction_job"

    def missing_inputs(self) -> list[str]:
        from models_app.services import get_model

        missing = []
        try:
            model = get_model(self.model_id) if self.model_id else None
        except ServiceError:
            model = None
        if model is None:
            missing.append("its model")
        if self.dataset_id is None or not Dataset.objects.filter(pk=self.dataset_id).exists():
            missing.append("its dataset")
        return missing

    def before_retry(self, resume: bool) -> None:
        if not resume:
            self.remove_job_files()  # a retry starts over: the checkpoint a Resume would go on from goes
        elif self.resume_path is None:
            raise Conflict("not_resumable", f"{self.label} kept no checkpoint to resume from; retry it from the start.")

    def placement_judge(self):
        """A worker that can load its model as it is."""
        return self.model.load_verdict if self.model is not None else None

    def job_paths(self) -> list:
        return [self.final_dir, staged_path(self.final_dir)]

    @property
    def resume_path(self):
        """The stopped run's files, when a checkpoint made some rows durable: a worker death,
        a timeout or a cancel that kept them leaves them for Resume."""
        staged = staged_path(self.final_dir)
        return staged if read_checkpoint(staged) is not None else None

    @property
    def resumable_rows(self) -> int:
        checkpoint = read_checkpoint(staged_path(self.final_dir))
        return checkpoint["rows"] if checkpoint else 0

    def event_group(self) -> str | None:
        return progress.model_group(self.model_id, "extraction") if self.model_id else None

    def delete_blocker(self) -> str | None:
        if self.export_runs.filter(status__in=Export.RUNNING).exists():
            return f"An export of {self.label} is running; cancel it before deleting the extraction."
        return None

    @property
    def export_list(self):
        """Its exports, newest first, for its page."""
        return list(self.export_runs.all()[:20])

    @property
    def export_running(self) -> bool:
        return any(export.is_running for export in self.export_list)

    def detail_html(self, oob: bool = False, action_error: str | None = None) -> str:
        """The detail page's body: card, actions, charts and the numbers table."""
        from .charts import file_histograms, layer_charts, outlier_rows

        thresholds = {s.get("sparsity_threshold") for s in self.statistics.values()}
        return render_to_string("activations_app/_extraction_detail.html", {
            "extraction": self, "oob": oob, "action_error": action_error,
            "sparsity_threshold": ", ".join(str(t) for t in sorted(thresholds)),
            "charts": layer_charts(self.statistics, self.layers, self.hook_types),
            "histograms": file_histograms(self.statistics),
            "outliers": outlier_rows(self.statistics),
        })  # fmt: skip

    def live_html(self) -> str:
        """The card for the lists, and the whole body for its own detail page, which then
        finishes live (statistics in, Cancel gone); a page without the target skips it."""
        return self.card_html(oob=True) + self.detail_html(oob=True)

    def publish_added(self) -> None:
        """The new card first in every open list (of all extractions, or of its model's)."""
        progress.publish_html(render_to_string("activations_app/_extraction_added.html", {"extraction": self}), self.html_group)

    def publish_removed(self) -> None:
        progress.publish_html(f'<div id="extraction-card-{self.id}" hx-swap-oob="delete"></div>', self.html_group)

    PANEL_SIZE = 20  # cards per page (the rest load on demand)

    @classmethod
    def panel_page(cls, page: int = 1, filters=None) -> dict:
        """One page of cards (newest first, or as `filters`, an ExtractionFilters, narrow and
        order them; its model_id is one model's history), whether another follows, and the
        counts the page shows."""
        from .forms import ExtractionFilters

        filters = filters if filters is not None else ExtractionFilters({})
        model_id = (filters.cleaned_data.get("model_id") or "") if filters.is_valid() else ""
        return {**filtered_page(cls.rows(), filters, page, cls.PANEL_SIZE, "extractions"), "narrowing": filters.narrowing(),
                "model_id": model_id}  # fmt: skip

    @classmethod
    def list_html(cls, model_id: str | None = None, oob: bool = False, filters=None) -> str:
        from .forms import ExtractionFilters

        if filters is None:
            filters = ExtractionFilters({"model_id": model_id} if model_id else {})
        return render_to_string("activations_app/_extraction_list.html", {**cls.panel_page(filters=filters), "oob": oob})

    @property
    def duration_seconds(self) -> float | None:
        """From the request to the end, for a run that ended."""
        if self.is_running or not self.created_at or not self.updated_at:
            return None
        return max(0.0, (self.updated_at - self.created_at).total_seconds())

    @property
    def size_bytes(self) -> int | None:
        """What its finished files take on disk."""
        try:
            return sum(entry.stat().st_size for entry in os.scandir(self.final_dir) if entry.is_file())
        except OSError:
            return None

    def progress_event(self) -> dict:
        if self.status == ExtractionStatus.COMPLETED:
            return {"type": "extraction_completed", "extraction_id": self.id, "output_path": self.output_path,
                    "statistics": self.statistics}  # fmt: skip
        return {
            "type": "extraction_progress", "extraction_id": self.id, "status": self.status,
            "progress": round(self.progress, 2), "samples_processed": self.samples_done,
            "samples_per_second": round(self.samples_per_second, 3), "eta_seconds": self.eta_seconds,
            "error": self.error_message or None,
        }  # fmt: skip

    def as_dict(self) -> dict:
        return {
            "id": self.id, "model_id": self.model_id, "dataset_id": self.dataset_id, **self.spec.request(),
            "status": self.status,
            "progress": round(self.progress, 2), "samples_processed": self.samples_done,
            "samples_total": self.samples_total, "samples_per_second": round(self.samples_per_second, 3),
            "eta_seconds": self.eta_seconds, "output_path": self.output_path or None, "statistics": self.statistics,
            "error_code": self.error_code or None, "error_message": self.error_message or None, "notice": self.notice or None,
            "attempt": self.attempt,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "exports": self.exports, "resumable_from": self.resumable_rows or None,
        }  # fmt: skip

    @property
    def exports(self) -> dict:
        """Finished exports by format (a folder exists only once it is whole)."""
        return {fmt: str(self.final_dir / fmt) for fmt in ("saelens",) if (self.final_dir / fmt / "export.json").is_file()}


class ExportStatus(models.TextChoices):
    QUEUED = "queued"
    EXPORTING = "exporting"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


def new_export_id() -> str:
    return f"exp_{secrets.token_hex(6)}"


EXPORT_FORMAT_LABELS = {"saelens": "SAELens"}


class Export(TrackedRow):
    """One export of a completed extraction in a trainer's format, a tracked job like every
    other: queued, exporting with progress, completed, failed or cancelled; one at a time
    per extraction and format. It writes into a staging folder of its own (named after it,
    beside the target) and moves it into place whole: its job's only files are that folder,
    so a cancel, a failure or a dead worker removes nothing else, never the target."""

    KIND = "export"
    QUEUED, DONE, FAILED, CANCELLED = ExportStatus.QUEUED, ExportStatus.COMPLETED, ExportStatus.FAILED, ExportStatus.CANCELLED
    RUNNING = (ExportStatus.QUEUED, ExportStatus.EXPORTING)
    card_template = "activations_app/_export_card.html"
    html_group = progress.EXTRACTIONS_GROUP
    job_function = "activations_app.jobs.export_job"

    id = models.CharField(primary_key=True, max_length=16, default=new_export_id, editable=False)
    extraction = models.ForeignKey(Extraction, on_delete=models.CASCADE, related_name="export_runs")
    format = models.CharField(max_length=16, default="saelens")
    naming = models.CharField(max_length=4, default="hf")  # hook names: module paths (hf) or TransformerLens (tl)
    shuffle_seed = models.BigIntegerField(null=True, blank=True)  # rows permuted across the export by this seed; None: text order
    out_path = models.CharField(max_length=1000)  # the folder it writes, resolved when it was asked for
    status = models.CharField(max_length=12, choices=ExportStatus.choices, default=ExportStatus.QUEUED)
    rows_done = models.BigIntegerField(default=0)
    rows_total = models.BigIntegerField(default=0)
    paths = models.JSONField(default=list, blank=True)  # the datasets written, one per layer/hook

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.id} ({self.status})"

    @classmethod
    def rows(cls):
        return cls.objects.select_related("extraction")

    @property
    def format_label(self) -> str:
        return EXPORT_FORMAT_LABELS.get(self.format, self.format)

    @property
    def out_dir(self) -> Path:
        return Path(self.out_path)

    @property
    def saelens_snippet(self) -> str:
        """The SAELens runner settings for its first hook, from its export.json ("" until it is whole)."""
        import json

        from .ml.export import saelens_snippet

        try:
            return saelens_snippet(json.loads((self.out_dir / "export.json").read_text())) if self.is_ready else ""
        except (OSError, ValueError, KeyError, IndexError):
            return ""

    @property
    def staging_dir(self) -> Path:
        return self.out_dir.with_name(f".{self.out_dir.name}.partial-{self.id}")

    def job_paths(self) -> list:
        return [self.staging_dir]

    def may_change(self, user) -> bool:
        """Its own owner, staff, or the owner of the extraction it reads (whose delete it blocks
        while it runs)."""
        return super().may_change(user) or self.extraction.may_change(user)

    def missing_inputs(self) -> list[str]:
        extraction = self.extraction
        if extraction.status != ExtractionStatus.COMPLETED or not (extraction.final_dir / "metadata.json").is_file():
            return ["its extraction's files"]
        return []

    def live_html(self) -> str:
        """Its card on its extraction's page, and that page's export list (a new export,
        a finished one's path)."""
        return self.extraction.detail_html(oob=True)

    def publish_added(self) -> None:
        self.publish()

    def event_group(self) -> str | None:
        return self.extraction.event_group()

    def progress_event(self) -> dict:
        return {"type": "export_progress", "export_id": self.id, "extraction_id": self.extraction_id, "format": self.format,
                "status": self.status, "progress": round(self.progress, 2), "rows_done": self.rows_done,
                "rows_total": self.rows_total, "path": self.out_path if self.is_ready else None,
                "error": self.error_message or None}  # fmt: skip

    def as_dict(self) -> dict:
        return {
            "id": self.id, "extraction_id": self.extraction_id, "format": self.format, "naming": self.naming,
            "shuffle_seed": self.shuffle_seed, "status": self.status,
            "progress": round(self.progress, 2), "rows_done": self.rows_done, "rows_total": self.rows_total,
            "path": self.out_path, "datasets": self.paths, "error_code": self.error_code or None,
            "error_message": self.error_message or None, "notice": self.notice or None, "attempt": self.attempt,
            "created_at": self.created_at.isoformat() if self.created_at else None,
        }  # fmt: skip


def new_template_id() -> str:
    return f"tpl_{secrets.token_hex(6)}"


class ExtractionTemplate(models.Model):
    """A saved extraction request (layers, hooks and settings) its owner can load into the
    dialog again, by name; favourites come first. Layers a smaller model lacks are left out
    when it is loaded there."""

    id = models.CharField(primary_key=True, max_length=16, default=new_template_id, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE,
                              related_name="+")  # fmt: skip
    name = models.CharField(max_length=100)
    request = models.JSONField(help_text="The validated request: layers, hook_types and the dialog's settings.")
    favourite = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-favourite", "name"]
        # Saving under a name one already has replaces it (services.save_template).
        constraints = [models.UniqueConstraint(fields=["owner", "name"], name="one_template_name_per_owner")]

    def __str__(self) -> str:
        return f"{self.name} ({self.id})"

    def as_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "favourite": self.favourite, **self.request,
                "created_at": self.created_at.isoformat() if self.created_at else None,
                "updated_at": self.updated_at.isoformat() if self.updated_at else None}  # fmt: skip
