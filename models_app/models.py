import secrets
import shutil
from pathlib import Path

from django.conf import settings
from django.db import models
from django.db.models import F, Value
from django.db.models.functions import Coalesce, NullIf
from django.template.loader import render_to_string
from django.utils.functional import cached_property

from mistudio import capacity, progress
from mistudio import queue as progress_queue
from mistudio.errors import JobError
from mistudio.filters import filtered_page
from mistudio.hub import format_bytes
from mistudio.jobs import TransferRow
from mistudio.staging import staged_path

from .ml.formats import BYTES_PER_PARAM


def new_model_id() -> str:
    return f"m_{secrets.token_hex(6)}"


class ModelStatus(models.TextChoices):
    QUEUED = "queued"
    DOWNLOADING = "downloading"
    LOADING = "loading"
    QUANTIZING = "quantizing"
    READY = "ready"
    ERROR = "error"
    CANCELLED = "cancelled"


RUNNING_STATUSES = (ModelStatus.QUEUED, ModelStatus.DOWNLOADING, ModelStatus.LOADING, ModelStatus.QUANTIZING)

PHASE_LABELS = {
    ModelStatus.QUEUED: "Queued",
    ModelStatus.DOWNLOADING: "Download Progress",
    ModelStatus.LOADING: "Loading",
    ModelStatus.QUANTIZING: "Quantizing",
}
# The quantizing phase's parts, by where its progress is (the job moves it through each):
# FP32's pass over the shipped text (the reference, recorded once per snapshot), the weights
# themselves, then the new format's pass (perplexity and fidelity by layer), which take most
# of a small model's time (45-60 s with no word of it before).
QUANTIZING_STEPS = ((15.0, "Running FP32 on the shipped text (the reference)"), (60.0, "Quantizing"),
                    (100.0, "Measuring perplexity and fidelity by layer on the shipped text"))  # fmt: skip


class Model(TransferRow):
    """One downloadable artifact: a repo at a revision in one quantization format."""

    KIND = "model"
    QUEUED, DONE, FAILED, CANCELLED = ModelStatus.QUEUED, ModelStatus.READY, ModelStatus.ERROR, ModelStatus.CANCELLED
    RUNNING = RUNNING_STATUSES
    card_template = "models_app/_card.html"
    PANEL_SIZE = 20  # cards per page of the panel (the rest load on demand)

    SOURCE_CHOICES = [("hub", "Hugging Face Hub"), ("local", "Local folder"), ("gguf", "GGUF file")]

    id = models.CharField(primary_key=True, max_length=16, default=new_model_id, editable=False)
    name = models.CharField(max_length=200)
    repo_id = models.CharField(max_length=200, blank=True)
    revision = models.CharField(max_length=200, blank=True, help_text="The resolved commit id.")
    requested_revision = models.CharField(max_length=200, blank=True, default="main")
    source = models.CharField(max_length=8, choices=SOURCE_CHOICES, default="hub")
    source_path = models.CharField(max_length=1000, blank=True, help_text="For imports: the file or folder read.")

    architecture = models.CharField(max_length=40, blank=True)
    params_count = models.BigIntegerField(null=True, blank=True)
    architecture_config = models.JSONField(default=dict, blank=True)
    quantization = models.CharField(max_length=8, default="FP32", help_text="The format actually produced.")
    requested_quantization = models.CharField(max_length=8, default="FP32")

    status = models.CharField(max_length=16, choices=ModelStatus.choices, default=ModelStatus.QUEUED)
    suggested_format = models.CharField(max_length=8, blank=True)

    file_path = models.CharField(max_length=1000, blank=True)
    quantized_path = models.CharField(max_length=1000, blank=True)
    snapshot_of = models.CharField(
        max_length=16, blank=True, help_text="Id of the model whose raw snapshot this one was made from (shared)."
    )
    memory_required_bytes = models.BigIntegerField(null=True, blank=True, help_text="Estimate: weights × 1.2.")
    memory_measured_bytes = models.BigIntegerField(null=True, blank=True, help_text="Footprint of the loaded weights.")
    peak_cuda_bytes = models.BigIntegerField(null=True, blank=True)
    disk_size_bytes = models.BigIntegerField(null=True, blank=True)
    perplexity = models.FloatField(null=True, blank=True, help_text="On the shipped reference text.")
    perplexity_baseline = models.FloatField(null=True, blank=True, help_text="FP32 weights, same text.")
    format_notes = models.TextField(blank=True, help_text="Why the produced format differs from the requested one.")
    fidelity = models.JSONField(default=dict, blank=True, help_text="How far its activations are from FP32's on "
                                "the shipped text, by layer and hook, and at the output (models_app.ml.fidelity).")  # fmt: skip
    verification = models.JSONField(default=dict, blank=True, help_text="The last check of its files against the "
                                    "SHA-256 each had when it arrived: state, when, files checked, problems.")  # fmt: skip
    token_given = models.BooleanField(default=False, help_text="The download was given a Hub token (the token itself "
                                                               "is dropped when the job stops), so a retry asks for one.")


    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["status"], name="model_status_idx"),
            models.Index(fields=["architecture"], name="model_architecture_idx"),
            models.Index(fields=["-created_at"], name="model_created_desc_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.quantization}, {self.status})"

    def _config(self, *names: str, default=None):
        """The first of `names` that the config sets (families name the same thing differently)."""
        config = self.architecture_config or {}
        return next((config[name] for name in names if config.get(name) is not None), default)

    @property
    def num_layers(self) -> int:
        return int(self._config("num_hidden_layers", "n_layer", default=0))

    @property
    def hidden_size(self) -> int:
        return int(self._config("hidden_size", "n_embd", default=0))

    @property
    def max_positions(self) -> int | None:
        value = self._config("max_position_embeddings", "n_positions")
        return int(value) if value is not None else None

    @property
    def quantize_choices(self) -> list[str]:
        """The formats "Quantize to…" offers: every other one."""
        return [fmt for fmt in BYTES_PER_PARAM if fmt != self.quantization]

    @property
    def quantize_default(self) -> str | None:
        """What "Quantize to…" starts on: the next smaller format (the usual reason to quantize)."""
        order = list(BYTES_PER_PARAM)
        smaller = order[order.index(self.quantization) + 1 :] if self.quantization in order else []
        return smaller[0] if smaller else None

    @property
    def shows_transfer(self) -> bool:
        """Bytes, speed and ETA beside the bar: a download's, or a quantization's streamed from the shards."""
        return bool(self.bytes_total) and self.status in (ModelStatus.DOWNLOADING, ModelStatus.QUANTIZING)

    @property
    def phase_label(self) -> str:
        if self.status == ModelStatus.QUANTIZING:
            return next(label for end, label in QUANTIZING_STEPS if self.progress < end or end == 100.0)
        return PHASE_LABELS.get(self.status, "")

    @property
    def snapshot_owner(self) -> str:
        return self.snapshot_of or self.id

    @property
    def raw_dir(self) -> Path:
        return settings.DATA_DIR / "models" / "raw" / self.snapshot_owner

    @property
    def reference_dir(self) -> Path:
        """The snapshot's FP32 pass over the shipped text (models_app.ml.fidelity.record),
        shared by every format made from it and removed with the snapshot."""
        return settings.DATA_DIR / "models" / "reference" / self.snapshot_owner

    @property
    def weights_dir(self) -> Path:
        """Where this record's own format lives: the quantized folder, or the raw snapshot for FP32."""
        return Path(self.quantized_path) if self.quantized_path else self.raw_dir

    @property
    def quality_change_percent(self) -> float | None:
        if self.perplexity is None or not self.perplexity_baseline:
            return None
        return 100.0 * (self.perplexity - self.perplexity_baseline) / self.perplexity_baseline

    @property
    def overall_progress(self) -> float:
        """The whole job's progress, which never moves back across phases (each phase's
        own `progress` starts again at 0): fetching or copying the weights takes the first
        80 % when a quantization follows (95 % when not), loading ends there, quantizing
        and measuring take the rest."""
        quantizes = self.requested_quantization not in ("", "FP32")
        fetched = 80.0 if quantizes else 95.0
        if self.status == ModelStatus.READY:
            return 100.0
        if self.status in (ModelStatus.DOWNLOADING, ModelStatus.LOADING):
            return self.progress * fetched / 100
        if self.status == ModelStatus.QUANTIZING:
            return fetched + self.progress * (100 - fetched) / 100
        return 0.0

    def known_baseline(self) -> float | None:
        """The FP32 weights' perplexity on the shipped text, measured once per snapshot (when a
        format was made from it) and shared by every record of that snapshot."""
        return (
            self.snapshot_users()
            .exclude(perplexity_baseline=None)
            .values_list("perplexity_baseline", flat=True)
            .first()
        )

    @cached_property
    def fp32_perplexity(self) -> float | None:
        """What a ready FP32 card shows as its own perplexity: the baseline the other formats
        of its snapshot are compared with (None until one of them measured it)."""
        if self.quantization != "FP32" or self.status != ModelStatus.READY:
            return None
        if self.perplexity is not None:
            return self.perplexity
        return self.perplexity_baseline if self.perplexity_baseline is not None else self.known_baseline()

    @property
    def quality_band(self) -> str | None:
        """Perplexity against FP32: fine within 5 %, caution within 25 %, else unusable."""
        change = self.quality_change_percent
        if change is None:
            return None
        return "fine" if change <= 5 else "caution" if change <= 25 else "unusable"

    @property
    def quality_text(self) -> str:
        """"+3.1 % vs FP32", or "×120,000 vs FP32" once it is many times worse."""
        change = self.quality_change_percent
        if change is None:
            return ""
        if change >= 100:
            return f"×{self.perplexity / self.perplexity_baseline:,.0f} vs FP32"
        return f"{'+' if change >= 0 else '−'}{abs(change):.1f} % vs FP32"

    @property
    def fidelity_lowest(self) -> tuple[int, str, float] | None:
        """(layer, hook, cosine) of its lowest mean cosine with FP32, when it was measured."""
        from .ml.fidelity import weakest

        return weakest(self.fidelity) if self.fidelity else None

    @property
    def fidelity_flagged(self) -> bool:
        lowest = self.fidelity_lowest
        return lowest is not None and lowest[2] < settings.FIDELITY_COSINE_WARN

    @property
    def verification_shown(self) -> dict:
        """`verification` as the card shows it: a check whose job ended without recording an
        outcome (its worker killed) says so, instead of "checking" for ever."""
        check = self.verification or {}
        if check.get("state") == "checking" and progress_queue.side_job_stopped(check.get("job_id"), check.get("asked_at")):
            return {**check, "state": "failed", "problems": ["The check stopped before it finished (its worker stopped); "
                                                             "press Verify files again."]}  # fmt: skip
        return check

    @property
    def verified_at(self):
        """When the last check of its files ended (None while none has)."""
        from django.utils.dateparse import parse_datetime

        at = (self.verification or {}).get("at")
        return parse_datetime(at) if isinstance(at, str) else None

    @cached_property
    def extraction_ids(self) -> list[str]:
        """Its extractions' ids, newest first, read once per card (its history link and the
        delete confirm, which names those that remain)."""
        return list(self.extractions.values_list("id", flat=True))

    @cached_property
    def source_model(self):
        """The model whose snapshot this variant was made from, while it exists."""
        return Model.objects.filter(pk=self.snapshot_of).only("id", "name", "quantization").first() if self.snapshot_of else None

    def quantized_dir(self, fmt: str) -> Path:
        return settings.DATA_DIR / "models" / "quantized" / f"{self.id}_{fmt}"

    @staticmethod
    def users_of(snapshot: str):
        """Every record made from raw snapshot `snapshot` (its first owner's id), that owner included."""
        return Model.objects.filter(models.Q(snapshot_of=snapshot) | models.Q(pk=snapshot))

    def snapshot_users(self):
        """Every record made from the raw snapshot this one uses (itself included)."""
        return Model.users_of(self.snapshot_owner)

    def owned_dirs(self) -> list[Path]:
        """Every folder only this record's job writes (for cleanup): its quantized folders,
        and the raw snapshot when it downloaded or imported it and no other record uses it;
        each with what a job staged. A snapshot taken from another record is never its job's
        to remove: it goes with the last of its users (`delete`)."""
        dirs = [self.quantized_dir(fmt) for fmt in BYTES_PER_PARAM]  # every format a job can make
        if not self.snapshot_of and not self.snapshot_users().exclude(pk=self.pk).exists():
            dirs[:0] = [self.raw_dir, self.reference_dir]
        return [path for folder in dirs for path in (folder, staged_path(folder))]

    def delete(self, *args, **kwargs):
        """The row; and the shared snapshot it was made from, when it was that snapshot's
        last user (its first owner deleted before it)."""
        shared = (self.raw_dir, self.reference_dir) if self.snapshot_of else ()
        result = super().delete(*args, **kwargs)
        if shared and not self.snapshot_users().exists():
            for path in (*shared, *map(staged_path, shared)):
                shutil.rmtree(path, ignore_errors=True)
        return result

    def shared_snapshot_for(self, sha: str):
        """A ready record of this repo at commit `sha` whose raw snapshot is on disk, complete:
        a download of another format is made from it instead of fetching the weights again."""
        others = Model.objects.filter(source="hub", repo_id=self.repo_id, revision=sha, status=ModelStatus.READY)
        for other in others.exclude(pk=self.pk).order_by("created_at"):
            if (other.raw_dir / "config.json").is_file():
                return other
        return None

    def job_paths(self) -> list[Path]:
        return self.owned_dirs()

    @property
    def download_target(self) -> Path:
        return self.raw_dir

    def stop_fields(self, error: JobError | None) -> dict:
        fields = super().stop_fields(error)
        if error is not None:
            fields["suggested_format"] = error.suggested_format or ""
        return fields

    def retry_fields(self, token: str | None) -> dict:
        return {**super().retry_fields(token), "suggested_format": "", **({"token_given": True} if token else {})}

    @property
    def retry_asks_for_token(self) -> bool:
        """A retry's form has a token field: the Hub refused without one, or the download had
        one (dropped when it stopped: a cancelled gated download is retried with it again)."""
        return self.token_given or self.error_code.startswith("gated") or self.error_code in ("invalid_token", "token_unreadable")

    @property
    def job_function(self) -> str:
        if self.snapshot_of:
            return "models_app.jobs.quantize_model_job"
        return "models_app.jobs.download_model_job" if self.source == "hub" else "models_app.jobs.import_model_job"

    def placement_judge(self):
        """Its job (download, import or quantization) needs a worker that can make and hold
        the requested format (or fall back to a smaller one there); any worker until its
        config is known (the job then judges)."""
        return format_judge(self.architecture_config, self.requested_quantization) if self.architecture_config else None

    def load_verdict(self, worker: capacity.Capacity) -> capacity.Verdict:
        """Whether `worker` can load this ready model as it is (an extraction): its format's
        estimate on that worker's device (bitsandbytes' Q8/Q4 load and run on a CPU worker too)."""
        from .ml import quantize

        fmt = self.quantization
        need = quantize.memory_estimate(self.architecture_config, worker.device)[fmt]
        if need > worker.budget_bytes:
            return capacity.Verdict(f"{self.name} {fmt} needs {format_bytes(need)}, more than its "
                                    f"{format_bytes(worker.budget_bytes)} budget")  # fmt: skip
        return capacity.Verdict()

    def event_group(self) -> str:
        return progress.model_group(self.id)

    def publish_added(self) -> None:
        """The new row into its snapshot's card when the pages show it (a format made from
        it), else a new card put first in every open list (and the empty state gone)."""
        group = ModelGroup.of(self.snapshot_owner)
        if group is not None and len(group.rows) > 1:
            progress.publish_html(render_to_string("models_app/_row_added.html", {"model": self, "group": group})
                                  + group.head_html(oob=True))  # fmt: skip
        else:
            progress.publish_html(render_to_string("models_app/_card_added.html", {"group": group or ModelGroup([self])}))

    def publish_removed(self) -> None:
        """Its row goes; its snapshot's card too when it was the last, else that card's figures change."""
        html = f'<div id="model-card-{self.id}" hx-swap-oob="delete"></div>'
        group = ModelGroup.of(self.snapshot_owner)
        if group is None:
            html += f'<div id="model-group-{self.snapshot_owner}" hx-swap-oob="delete"></div>'
        else:
            html += group.head_html(oob=True)
        progress.publish_html(html)

    def publish_moved(self) -> None:
        """A download found its snapshot already here: its card of its own goes, its row joins that snapshot's."""
        progress.publish_html(f'<div id="model-group-{self.id}" hx-swap-oob="delete"></div>')
        self.publish_added()

    def live_html(self) -> str:
        """The row; and once it stopped running, its snapshot card's figures (the sizes on
        disk change only then; a new format's row changes the count in publish_added), not
        on every progress update."""
        group = None if self.is_running else ModelGroup.of(self.snapshot_owner)
        return self.card_html(oob=True) + (group.head_html(oob=True) if group is not None else "")

    def delete_blocker(self) -> str | None:
        if any(extraction.is_running for extraction in self.extractions.all()):
            return f"An extraction of {self.name} is running; cancel it before deleting the model."
        return None

    @classmethod
    def panel_page(cls, page: int = 1, filters=None) -> dict:
        """One page of snapshot cards (ModelGroup: a repo@revision with its formats as rows;
        newest first, or as `filters`, a ModelFilters, narrow and order them), whether another
        follows, and the counts the page shows (one per snapshot)."""
        from .forms import ModelFilters

        found = filtered_page(cls.objects.all(), filters if filters is not None else ModelFilters({}), page, cls.PANEL_SIZE,
                              "models", group_by=SNAPSHOT_GROUP)  # fmt: skip
        return {**found, "groups": [ModelGroup(rows) for rows in found["groups"]]}

    @classmethod
    def list_html(cls, oob: bool = False, filters=None) -> str:
        return render_to_string("models_app/_model_list.html", {**cls.panel_page(filters=filters), "oob": oob})

    def progress_event(self) -> dict:
        """The JSON event describing this row's current state (absolute, never a delta)."""
        base = {"model_id": self.id, "status": self.status, "progress": round(self.progress, 2)}
        if self.status == ModelStatus.READY:
            return {
                "type": "completed",
                **base,
                "memory_required_bytes": self.memory_required_bytes,
                "memory_measured_bytes": self.memory_measured_bytes,
                "disk_size_bytes": self.disk_size_bytes,
                "params_count": self.params_count,
                "requested_format": self.requested_quantization,
                "quantization": self.quantization,
                "format_notes": self.format_notes or None,
                "perplexity": self.perplexity,
            }
        if self.status == ModelStatus.ERROR:
            return {
                "type": "error",
                **base,
                "error": self.error_message,
                "code": self.error_code,
                "requested_format": self.requested_quantization,
                "suggested_format": self.suggested_format or None,
            }
        return {
            "type": "progress",
            **base,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "speed_mbps": self.speed_mbps,
            "eta_seconds": None if self.eta_seconds is None else round(self.eta_seconds, 1),
        }

    def as_dict(self, include_config: bool = True) -> dict:
        """The API / --json representation, with DESIGN.md's field names."""
        data = {
            "id": self.id,
            "name": self.name,
            "status": self.status,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "source": self.source,
            "architecture": self.architecture,
            "params_count": self.params_count,
            "quantization": self.quantization,
            "requested_quantization": self.requested_quantization,
            "progress": round(self.progress, 2),
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "speed_mbps": self.speed_mbps,
            "eta_seconds": self.eta_seconds,
            "error_code": self.error_code or None,
            "error_message": self.error_message or None,
            "notice": self.notice or None,
            "attempt": self.attempt,
            "suggested_format": self.suggested_format or None,
            "file_path": self.file_path or None,
            "quantized_path": self.quantized_path or None,
            "memory_required_bytes": self.memory_required_bytes,
            "memory_measured_bytes": self.memory_measured_bytes,
            "peak_cuda_bytes": self.peak_cuda_bytes,
            "disk_size_bytes": self.disk_size_bytes,
            "perplexity": self.perplexity,
            "perplexity_baseline": self.perplexity_baseline,
            "format_notes": self.format_notes or None,
            "snapshot_of": self.snapshot_of or None,
            "snapshot_id": self.snapshot_owner,
            "verification": self.verification or None,
            "fidelity": self.fidelity or None,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
        }
        if include_config:
            data["architecture_config"] = self.architecture_config
        return data


# Each row's snapshot: the records made from one raw snapshot (one repo@revision) share a card.
SNAPSHOT_GROUP = Coalesce(NullIf(F("snapshot_of"), Value("")), F("id"))


class ModelGroup:
    """One repo@revision's card on the Models page: the formats made from its raw snapshot,
    as rows (the snapshot's own first), and what they hold on disk, the shared snapshot
    counted once."""

    def __init__(self, rows: list[Model]) -> None:
        self.rows = rows
        self.key = rows[0].snapshot_owner

    @classmethod
    def of(cls, key: str) -> "ModelGroup | None":
        rows = list(Model.users_of(key).order_by("created_at", "pk"))
        return cls(rows) if rows else None

    @property
    def first(self) -> Model:
        return self.rows[0]

    @property
    def title(self) -> str:
        return self.first.repo_id or self.first.name

    @property
    def revision(self) -> str:
        return self.first.revision

    @cached_property
    def snapshot_bytes(self) -> int:
        """The raw snapshot's bytes on disk (0 until one is there)."""
        from .ml.loading import folder_size

        raw = self.first.raw_dir
        return folder_size(raw) if raw.is_dir() else 0

    @cached_property
    def reference_bytes(self) -> int:
        """The FP32 reference pass kept on disk to compare new formats with, as it recorded
        its size (models_app.ml.fidelity; hundreds of files, not listed for every card)."""
        from .ml.fidelity import recorded_bytes

        return recorded_bytes(self.first.reference_dir)

    @property
    def made_bytes(self) -> int:
        """What the formats made from the snapshot hold besides it."""
        return sum(row.disk_size_bytes or 0 for row in self.rows if row.quantized_path)

    @property
    def disk_bytes(self) -> int:
        return self.snapshot_bytes + self.made_bytes + self.reference_bytes

    @property
    def sharing(self) -> int:
        """How many records use the snapshot."""
        return len(self.rows)

    def head_html(self, oob: bool = False) -> str:
        return render_to_string("models_app/_group_head.html", {"group": self, "oob": oob})


def format_judge(config: dict, fmt: str):
    """How a worker is judged for making `fmt` of this config: whether it can make and hold
    it, or only by falling back to a smaller format (not `exact`)."""
    from .ml import quantize

    def judge(worker: capacity.Capacity) -> capacity.Verdict:
        try:
            made, _ = quantize.choose_format(fmt, quantize.memory_estimate(config, worker.device), worker.budget_bytes,
                                             worker.device)  # fmt: skip
        except JobError as exc:
            return capacity.Verdict(exc.message)
        return capacity.Verdict(exact=made == fmt)

    return judge
