"""RQ jobs: an id in, the row loaded, pure `ml` code called with a progress callback, the
outcome recorded. Also run inline by the management commands' --sync."""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from django.conf import settings
from django.db.models import Q
from django.utils import timezone
from rq.timeouts import JobTimeoutException

from mistudio.crypto import decrypt_secret
from mistudio.progress import LatestStateWriter

from . import services
from .ml import hub, loading, quality, quantize
from .ml.errors import JobCancelled, JobError
from .ml.gguf_import import gguf_to_safetensors
from .ml.progress import ProgressThrottle, TransferRate
from .models import RUNNING_STATUSES, Model, ModelStatus

log = logging.getLogger(__name__)

Listener = Callable[[Model], None]
MAX_WRITES_PER_SECOND = 10


class JobProgress:
    """Writes a running job's progress to its row and publishes it.

    Byte progress arrives from download threads many times a second; a publisher thread
    takes the latest state (throttled to 0.5 s or 1 %) and does the database write,
    rendering and channel-layer send, so the transfer itself never waits on them.
    Every write is conditional on the row not having been cancelled; finding it cancelled
    is how a job run inline learns it must stop (JobCancelled at its next update)."""

    def __init__(self, model_id: str, listener: Listener | None = None) -> None:
        self.model_id = model_id
        self.listener = listener
        self.throttle = ProgressThrottle()
        self.rate = TransferRate()
        self._lock = threading.Lock()
        self._writer = LatestStateWriter(
            lambda state: self.write(**state), name=f"progress-{model_id}", max_per_second=MAX_WRITES_PER_SECOND
        )

    def write(self, **fields) -> Model:
        with self._lock:
            updated = (
                Model.objects.filter(pk=self.model_id, status__in=RUNNING_STATUSES)
                .update(updated_at=timezone.now(), **fields)
            )
            if not updated:
                raise JobCancelled()
            model = Model.objects.get(pk=self.model_id)
        services.publish_card(model)
        if self.listener:
            self.listener(model)
        return model

    def phase(self, status: str, **fields) -> Model:
        """A status change: written at once, after any byte progress still pending."""
        self.flush()
        self.throttle.should_emit(0.0, force=True)
        return self.write(status=status, speed_bps=0, eta_seconds=None, **fields)

    def transfer(self, done: int, total: int) -> None:
        """Byte progress of the download or copy phase; cheap, callable from any thread."""
        self._writer.check()
        self.rate.add(done)
        percent = 100.0 * done / total if total else 100.0
        if not self.throttle.should_emit(percent, force=done >= total):
            return
        self._writer.submit(
            {
                "progress": percent,
                "bytes_done": done,
                "bytes_total": total,
                "speed_bps": self.rate.bytes_per_second(),
                "eta_seconds": self.rate.eta_seconds(total),
            }
        )

    def flush(self, raise_error: bool = True) -> None:
        """Write what is pending and stop the writer thread; raise if it found the row cancelled."""
        self._writer.flush(raise_error)


def _begin(model_id: str) -> Model | None:
    model = Model.objects.filter(pk=model_id).first()
    if model is None or model.status != ModelStatus.QUEUED:
        log.info("model %s is gone or no longer queued; nothing to do", model_id)
        return None
    return model


def _fail(model_id: str, error: JobError) -> None:
    Model.objects.filter(pk=model_id, status__in=RUNNING_STATUSES).update(
        status=ModelStatus.ERROR,
        error_code=error.code,
        error_message=error.message,
        suggested_format=error.suggested_format or "",
        encrypted_token=None,
        speed_bps=0,
        eta_seconds=None,
        updated_at=timezone.now(),
    )
    model = Model.objects.filter(pk=model_id).first()
    if model is not None:
        services.remove_files(model)
        services.publish_card(model)


def _run(model_id: str, body: Callable[[Model, JobProgress], None], listener: Listener | None) -> Model | None:
    """Shared outcome handling: cancelled → files removed; failed → row in error, files
    removed, exception re-raised so RQ records it too."""
    model = _begin(model_id)
    if model is None:
        return None
    reporter = JobProgress(model_id, listener)
    try:
        try:
            body(model, reporter)
        finally:
            reporter.flush()
    except JobCancelled:
        model = Model.objects.get(pk=model_id)
        services.remove_files(model)
        log.info("model %s cancelled; files removed", model_id)
    except JobError as exc:
        _fail(model_id, exc)
        raise
    except JobTimeoutException:
        _fail(model_id, JobError("timeout", f"The job passed the time limit of {services.job_timeout() / 3600:.0f} h "
                                            "(MISTUDIO_JOB_TIMEOUT) and was stopped; retry, or raise the limit."))  # fmt: skip
        raise
    except Exception as exc:
        log.exception("model %s failed unexpectedly", model_id)
        _fail(model_id, JobError("internal_error", f"Unexpected error: {type(exc).__name__}. See the worker log."))
        raise
    except BaseException:  # Ctrl-C in a --sync command: no row stays "downloading" with nobody on it
        _fail(model_id, JobError("interrupted", "The job was interrupted before it finished; start it again."))
        raise
    model = Model.objects.get(pk=model_id)
    if listener:
        listener(model)
    return model


def _finish(model: Model, reporter: JobProgress, requested: str) -> None:
    """Loading (config, architecture, exact parameters), then quantizing when the format to
    make is not the FP32 snapshot itself, then the figures a user compares formats by."""
    reporter.phase(ModelStatus.LOADING, progress=100.0)
    facts = loading.inspect_model(model.raw_dir)
    device = quantize.compute_device()
    estimates = quantize.memory_estimate(facts.config, device)
    reporter.write(
        architecture=facts.architecture,
        params_count=facts.params_count,
        architecture_config=facts.config,
        file_path=str(model.raw_dir),
    )
    budget = quantize.memory_budget(settings.GPU_MEMORY_LIMIT, device)
    fmt, notes = quantize.choose_format(requested, estimates, budget, device)
    figures: dict = {}
    if fmt != "FP32":
        reporter.phase(ModelStatus.QUANTIZING, progress=0.0)
        loaded, result = quantize.quantize_snapshot(model.raw_dir, requested, model.quantized_dir, estimates, budget, device)
        fmt, notes = result.produced, result.notes
        target = model.quantized_dir(fmt)
        log.info(
            "model %s %s: measured %d bytes, estimated %d (weights), error %+.1f%%",
            model.id, fmt, result.footprint_bytes, estimates[fmt] / 1.2,
            100 * (result.footprint_bytes - estimates[fmt] / 1.2) / (estimates[fmt] / 1.2),
        )  # fmt: skip
        reporter.write(progress=60.0)
        figures = {
            "quantized_path": str(target),
            "memory_measured_bytes": result.footprint_bytes,
            "peak_cuda_bytes": result.peak_cuda_bytes,
        }
        tokenizer = _tokenizer(model)
        figures |= _perplexity(model, loaded, tokenizer, "perplexity")
        del loaded  # the FP32 baseline may need the memory
        quantize.free_accelerator_memory()
        figures |= _baseline_perplexity(model, tokenizer, estimates, device)
    disk = loading.folder_size(Path(figures["quantized_path"]) if figures else model.raw_dir)
    reporter.write(
        status=ModelStatus.READY,
        progress=100.0,
        quantization=fmt,
        format_notes="\n".join(notes),
        memory_required_bytes=estimates[fmt],
        disk_size_bytes=disk,
        encrypted_token=None,
        speed_bps=0,
        eta_seconds=None,
        **figures,
    )


# Perplexity on the reference text is a figure, not the product: when it cannot be computed
# (no tokenizer, no memory left for the FP32 baseline, an error in the forward pass) the
# model is still ready, without it, and the worker log says why.


def _tokenizer(model: Model):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model.raw_dir)
    except (OSError, ValueError):
        log.info("model %s has no tokenizer: no perplexity figure", model.id)
        return None


def _perplexity(model: Model, loaded, tokenizer, field: str) -> dict:
    if tokenizer is None:
        return {}
    try:
        return {field: quality.perplexity(loaded, tokenizer)}
    except Exception:  # noqa: BLE001 - logged; the model itself is good
        log.exception("model %s: no %s figure; the model is ready without it", model.id, field)
        return {}


def _baseline_perplexity(model: Model, tokenizer, estimates: dict[str, int], device: str) -> dict:
    """The unquantized weights' perplexity: computed once per snapshot, reused by every format
    made from it; loaded only when FP32 fits in what is free now."""
    if tokenizer is None:
        return {}
    known = (
        Model.objects.filter(Q(snapshot_of=model.snapshot_owner) | Q(pk=model.snapshot_owner))
        .exclude(perplexity_baseline=None)
        .values_list("perplexity_baseline", flat=True)
        .first()
    )
    if known is not None:
        return {"perplexity_baseline": known}
    if estimates["FP32"] > quantize.memory_budget(settings.GPU_MEMORY_LIMIT, device):
        log.info("model %s: FP32 does not fit now; no baseline perplexity", model.id)
        return {}
    try:
        baseline = quantize.load_in_format(model.raw_dir, "FP32", device)
    except Exception:  # noqa: BLE001
        log.exception("model %s: the FP32 baseline could not be loaded; no baseline perplexity", model.id)
        return {}
    figures = _perplexity(model, baseline, tokenizer, "perplexity_baseline")
    del baseline
    quantize.free_accelerator_memory()
    return figures


def _download(model: Model, reporter: JobProgress) -> None:
    try:
        token = decrypt_secret(model.encrypted_token) if model.encrypted_token else None
    except ValueError:
        raise JobError("token_unreadable", "The stored Hub token cannot be decrypted here: the worker's SECRET_KEY "
                                           "differs from the web server's. Fix that, then download again with the token.") from None  # fmt: skip
    endpoint = settings.HF_ENDPOINT
    retry = {"retries": settings.HUB_RETRIES, "backoff_seconds": settings.HUB_RETRY_BACKOFF_SECONDS}
    reporter.phase(ModelStatus.DOWNLOADING, progress=0.0)
    plan = hub.plan_download(model.repo_id, model.requested_revision, token, endpoint, **retry)
    reporter.write(revision=plan.sha, bytes_total=plan.total_bytes)
    # config.json first: an unsupported architecture is refused before gigabytes move.
    hub.fetch_file(plan, "config.json", model.raw_dir, token, endpoint)
    config = loading.read_config(model.raw_dir)
    loading.check_architecture(config)
    # So is a model that fits the memory budget in no format, before its weights are fetched.
    device = quantize.compute_device()
    budget = quantize.memory_budget(settings.GPU_MEMORY_LIMIT, device)
    quantize.choose_format(model.requested_quantization, quantize.memory_estimate(config, device), budget, device)
    hub.ensure_free_space(model.raw_dir, plan.total_bytes, settings.DISK_RESERVE_BYTES)
    hub.download_snapshot(plan, model.raw_dir, token, endpoint, reporter.transfer, **retry)
    del token
    _finish(model, reporter, model.requested_quantization)


def _import(model: Model, reporter: JobProgress) -> None:
    source = Path(model.source_path)
    reporter.phase(ModelStatus.LOADING, progress=0.0)
    if model.source == "gguf":
        gguf_to_safetensors(source, model.raw_dir)
    else:
        _copy_model_folder(source, model.raw_dir, reporter)
    _finish(model, reporter, model.requested_quantization)


def _copy_model_folder(src: Path, dest: Path, reporter: JobProgress) -> None:
    files = [p for p in sorted(src.iterdir()) if p.is_file() and (p.suffix == ".safetensors" or p.name in loading.SIDECAR_FILES or p.name == "model.safetensors.index.json")]
    total = sum(p.stat().st_size for p in files)
    hub.ensure_free_space(dest.parent, total, settings.DISK_RESERVE_BYTES)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    done = 0
    try:
        for path in files:
            with path.open("rb") as reader, (tmp / path.name).open("wb") as writer:
                while chunk := reader.read(8 << 20):
                    writer.write(chunk)
                    done += len(chunk)
                    reporter.transfer(done, total)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run_download(model_id: str, listener: Listener | None = None) -> Model | None:
    return _run(model_id, _download, listener)


def run_import(model_id: str, listener: Listener | None = None) -> Model | None:
    return _run(model_id, _import, listener)


def run_quantize(model_id: str, listener: Listener | None = None) -> Model | None:
    return _run(model_id, lambda model, reporter: _finish(model, reporter, model.requested_quantization), listener)


def download_model_job(model_id: str) -> None:
    run_download(model_id)


def quantize_model_job(model_id: str) -> None:
    run_quantize(model_id)


def import_model_job(model_id: str) -> None:
    run_import(model_id)


def mark_worker_died(job_id: str, reason: str) -> None:
    """The worker process running a job died (killed, OOM): the row must not stay running."""
    for model in Model.objects.filter(job_id=job_id, status__in=RUNNING_STATUSES):
        _fail(model.id, JobError("worker_died", f"The worker process stopped unexpectedly ({reason}); retry."))
