"""The extraction job: id in, rows loaded, pure extraction code called with a progress
callback, outcome recorded. queued → loading → extracting → saving → completed."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from django.template.loader import render_to_string
from django.utils import timezone
from rq.timeouts import JobTimeoutException

from mistudio import progress
from mistudio.progress import LatestStateWriter
from models_app.ml import quantize
from models_app.ml.errors import JobCancelled, JobError
from models_app.ml.progress import ProgressThrottle

from .ml import datasets as dataset_files
from .ml.extract import ExtractionSpec, partial_dir, run_extraction, tokenize
from .models import EXTRACTION_RUNNING, Extraction, ExtractionStatus

log = logging.getLogger(__name__)


def _write_row(extraction_id: str, **fields) -> Extraction:
    """Conditional on the row still running: a cancelled row stops the job."""
    updated = Extraction.objects.filter(pk=extraction_id, status__in=EXTRACTION_RUNNING).update(
        updated_at=timezone.now(), **fields
    )
    if not updated:
        raise JobCancelled()
    extraction = Extraction.objects.select_related("model", "dataset").get(pk=extraction_id)
    publish(extraction)
    return extraction


def publish(extraction: Extraction) -> None:
    """The card for pages (out-of-band swap by id) and the JSON event for clients."""
    html = render_to_string("activations_app/_extraction_card.html", {"extraction": extraction, "oob": True})
    progress.publish_html(html)
    if extraction.model_id:
        progress.publish_event(extraction.model_id, extraction_event(extraction), channel="extraction")


def extraction_event(extraction: Extraction) -> dict:
    if extraction.status == ExtractionStatus.COMPLETED:
        return {"type": "extraction_completed", "extraction_id": extraction.id, "output_path": extraction.output_path,
                "statistics": extraction.statistics}  # fmt: skip
    return {
        "type": "extraction_progress", "extraction_id": extraction.id, "status": extraction.status,
        "progress": round(extraction.progress, 2), "samples_processed": extraction.samples_done,
        "samples_per_second": round(extraction.samples_per_second, 3), "eta_seconds": extraction.eta_seconds,
        "error": extraction.error_message or None,
    }  # fmt: skip


def run_extraction_job(extraction_id: str, listener=None) -> Extraction | None:
    """`listener(extraction)` sees every state written (the command's progress bar)."""
    extraction = Extraction.objects.select_related("model", "dataset").filter(pk=extraction_id).first()
    if extraction is None or extraction.status != ExtractionStatus.QUEUED:
        return None
    model_row, dataset = extraction.model, extraction.dataset

    def _write(extraction_id: str, **fields) -> Extraction:
        row = _write_row(extraction_id, **fields)
        if listener:
            listener(row)
        return row

    try:
        _write(extraction_id, status=ExtractionStatus.LOADING)
        from transformers import AutoTokenizer

        model = quantize.load_saved(model_row.weights_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_row.weights_dir)
        tokens = tokenize(
            dataset_files.iter_texts(Path(dataset.file_path), dataset.text_column),
            tokenizer, extraction.seq_len, extraction.tokenization, extraction.max_samples,
        )  # fmt: skip
        spec = ExtractionSpec(
            layers=extraction.layers, hooks=extraction.hook_types, seq_len=extraction.seq_len,
            batch_size=extraction.batch_size, max_samples=extraction.max_samples, dtype=extraction.dtype,
            tokenization=extraction.tokenization,
        )  # fmt: skip
        _write(extraction_id, status=ExtractionStatus.EXTRACTING, samples_total=len(tokens.ids))
        throttle = ProgressThrottle()
        # The forward loop hands progress over and goes on; a thread writes the row and
        # publishes the card (and finds a cancelled row, which stops the loop at its next batch).
        writer = LatestStateWriter(lambda state: _write(extraction_id, **state), name=f"extraction-{extraction_id}")

        def on_progress(done: int, total: int, seconds: float) -> None:
            writer.check()
            percent = 100.0 * done / total
            if throttle.should_emit(percent, force=done >= total):
                rate = done / seconds if seconds else 0.0
                writer.submit({"progress": percent, "samples_done": done, "samples_per_second": rate,
                               "eta_seconds": (total - done) / rate if rate else None})  # fmt: skip

        metadata = {
            "extraction_id": extraction.id, "model": {"id": model_row.id, "repo_id": model_row.repo_id,
            "revision": model_row.revision, "format": model_row.quantization, "architecture": model_row.architecture},
            "dataset": {"id": dataset.id, "name": dataset.name, "text_column": dataset.text_column},
            "tokenizer": tokenizer.name_or_path and Path(tokenizer.name_or_path).name, "created": time.time(),
            "compute": {"device": str(next(model.parameters()).device),
                        "dtype": str(next(p for p in model.parameters() if p.is_floating_point()).dtype).removeprefix("torch.")},
        }  # fmt: skip
        def on_saving() -> None:
            writer.flush()
            _write(extraction_id, status=ExtractionStatus.SAVING)

        try:
            result = run_extraction(
                model, model_row.architecture, tokens, spec, extraction.final_dir, metadata, on_progress, on_saving
            )
        except BaseException:
            writer.flush(raise_error=False)
            raise
        return _write(
            extraction_id, status=ExtractionStatus.COMPLETED, progress=100.0, output_path=str(result.output_dir),
            statistics=result.statistics, samples_per_second=result.samples_per_second, eta_seconds=None,
        )  # fmt: skip
    except JobCancelled:
        remove_output_dirs(extraction.final_dir)
        return Extraction.objects.get(pk=extraction_id)
    except BaseException as exc:
        # Everything else, down to a Ctrl-C in `extract_activations --sync`, ends the row as
        # failed with its reason: no row stays "extracting" with nobody running it.
        error = _as_job_error(exc)
        if not isinstance(exc, (JobError, JobTimeoutException, KeyboardInterrupt, SystemExit)):
            log.exception("extraction %s failed", extraction_id)
        remove_output_dirs(extraction.final_dir)
        Extraction.objects.filter(pk=extraction_id, status__in=EXTRACTION_RUNNING).update(
            status=ExtractionStatus.FAILED, error_code=error.code, error_message=error.message, eta_seconds=None
        )
        publish(Extraction.objects.select_related("model", "dataset").get(pk=extraction_id))
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise error from None


def _as_job_error(exc: BaseException) -> JobError:
    from models_app.services import job_timeout

    if isinstance(exc, JobError):
        return exc
    if isinstance(exc, JobTimeoutException):
        return JobError("timeout", f"The run passed the job time limit of {job_timeout() / 3600:.0f} h "
                                   "(MISTUDIO_JOB_TIMEOUT) and was stopped; use fewer samples or raise the limit.")  # fmt: skip
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return JobError("interrupted", "The run was interrupted before it finished; start it again.")
    return JobError("internal_error", f"Unexpected error: {type(exc).__name__}. See the worker log.")


def remove_output_dirs(final_dir: Path) -> None:
    shutil.rmtree(final_dir, ignore_errors=True)
    shutil.rmtree(partial_dir(final_dir), ignore_errors=True)


def extraction_job(extraction_id: str) -> None:
    run_extraction_job(extraction_id)


def mark_worker_died(job_id: str, reason: str) -> None:
    """The worker process died mid-extraction: the row ends failed, the partial folder goes."""
    for extraction in Extraction.objects.filter(job_id=job_id, status__in=EXTRACTION_RUNNING):
        remove_output_dirs(extraction.final_dir)
        Extraction.objects.filter(pk=extraction.pk, status__in=EXTRACTION_RUNNING).update(
            status=ExtractionStatus.FAILED, error_code="worker_died",
            error_message=f"The worker process stopped unexpectedly ({reason}); retry.",
        )  # fmt: skip
        publish(Extraction.objects.select_related("model", "dataset").get(pk=extraction.pk))
