"""The extraction and dataset-import jobs: their own work inside the shared lifecycle
(`mistudio.jobs`). Extraction: queued → loading → extracting → saving → completed.
Hub dataset import: queued → downloading → ready."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from django.conf import settings

from mistudio import capacity
from mistudio.errors import InvalidInput, JobError, ServiceError
from mistudio.hub import ensure_free_space
from mistudio.hub_access import retry_policy, stored_token
from mistudio.jobs import Listener, TrackedJob, run_tracked
from mistudio.staging import promote, staged_path
from models_app.ml import load_saved, tokenizer_for

from .ml import datasets as dataset_files
from .ml.export import check_free_space, export_bytes, export_saelens
from .ml.extract import STORAGE_DTYPES, file_stem, run_extraction
from .ml.reuse import describe, find_reusable
from .ml.tokens import STATISTICS_EXCLUDE, tokenize
from .ml.hooks import hook_targets
from .ml.hub_datasets import download_dataset, plan_dataset, stream_summary
from .ml.stats import warm as warm_statistics
from .models import Dataset, DatasetStatus, Export, ExportStatus, Extraction, ExtractionStatus

log = logging.getLogger(__name__)


def warm_up_worker() -> None:
    """Run once by each RQ worker before it forks its first work horse (mistudio.worker):
    numba's import and the compiled statistics pass (about 1 s), then shared by every job."""
    warm_statistics()


def _extract(extraction: Extraction, job: TrackedJob) -> None:
    model_row, dataset, spec = extraction.model, extraction.dataset, extraction.spec
    job.phase(ExtractionStatus.LOADING)
    tokenizer = tokenizer_for(model_row.weights_dir)
    tokens = tokenize(
        dataset.texts(reader_id=extraction.owner_id),
        tokenizer, spec.seq_len, spec.tokenization, spec.max_samples, spec.prepend_bos, spec.separator,
    )  # fmt: skip
    # Files a finished extraction already holds for these very rows are taken, not computed.
    requested = [file_stem(layer, hook) for layer in spec.layers for hook in spec.hook_types]
    sources = [(row.id, row.final_dir) for row in Extraction.reuse_sources(model_row.id, dataset.id, spec, exclude=extraction.id)]
    reused = find_reusable(sources, tokens, requested, STORAGE_DTYPES[spec.dtype], spec.sparsity_threshold)
    model = targets = None
    if len(reused) < len(requested):
        # Placed on a worker that reported room for it; checked again here, before loading.
        here = capacity.this_machine()
        refusal = model_row.load_verdict(here).refusal
        if refusal:
            raise JobError("does_not_fit", f"This worker ({here.label}) cannot load it: {refusal}.")
        model = load_saved(model_row.weights_dir)
        targets = hook_targets(model, spec.layers, spec.hook_types, only=set(requested) - set(reused) if reused else None)
    warm_statistics()  # at once where the worker warmed it up; numba is never imported by the web process
    job.phase(ExtractionStatus.EXTRACTING, samples_total=len(tokens.ids))
    if reused:
        sources_named = ", ".join(sorted({file.source_id for file in reused.values()}))
        said = f"{describe(spec.layers, spec.hook_types, set(reused))} (from {sources_named})."
        job.write(notice=(said[0].upper() + said[1:])[: Extraction._meta.get_field("notice").max_length])
    resumed = extraction.resumable_rows  # rows a stopped run made durable: they are not run again

    # The forward loop hands progress over and goes on; the job's writer thread writes the
    # row and publishes the card (and finds a cancelled row, which stops the loop).
    def on_progress(done: int, total: int, seconds: float) -> None:
        rate = (done - resumed) / seconds if seconds and done > resumed else 0.0
        job.report(
            100.0 * done / total,
            lambda: {"samples_done": done, "samples_per_second": rate, "eta_seconds": (total - done) / rate if rate else None},
            force=done >= total,
        )

    metadata = {
        "extraction_id": extraction.id, "model": {"id": model_row.id, "repo_id": model_row.repo_id,
        "revision": model_row.revision, "format": model_row.quantization, "architecture": model_row.architecture},
        "dataset": {"id": dataset.id, "name": dataset.name, "text_column": dataset.text_column},
        "tokenizer": tokenizer.name_or_path and Path(tokenizer.name_or_path).name, "created": time.time(),
        "compute": None if model is None else {"device": str(next(model.parameters()).device),
                    "dtype": str(next(p for p in model.parameters() if p.is_floating_point()).dtype).removeprefix("torch.")},
    }  # fmt: skip
    result = run_extraction(
        model, model_row.architecture, tokens, spec, extraction.final_dir, metadata, on_progress,
        on_saving=lambda: job.phase(ExtractionStatus.SAVING), targets=targets,
        fingerprint=_fingerprint(extraction, tokenizer), checkpoint_seconds=settings.EXTRACTION_CHECKPOINT_SECONDS,
        on_notice=lambda text: job.write(notice=text), reused=reused, decode=lambda token: tokenizer.decode([token]),
    )  # fmt: skip
    job.write(
        status=ExtractionStatus.COMPLETED, progress=100.0, output_path=str(result.output_dir),
        statistics=result.statistics, samples_per_second=result.samples_per_second, eta_seconds=None,
    )  # fmt: skip


def _fingerprint(extraction: Extraction, tokenizer) -> str:
    """What a resumed run must share with the stopped one: the request, the model's weights
    and the dataset's file (the tokens are compared as well, before going on)."""
    import hashlib
    import json

    model, dataset = extraction.model, extraction.dataset
    data = dataset.source_fingerprint()
    record = {"extraction": extraction.id, "request": extraction.spec.request(), "model": [model.id, model.revision,
              model.quantization], "dataset": [dataset.id, data], "tokenizer": type(tokenizer).__name__,
              "statistics_exclude": STATISTICS_EXCLUDE}  # fmt: skip
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _import_hub_dataset(dataset: Dataset, job: TrackedJob) -> None:
    token = stored_token(dataset.encrypted_token)
    endpoint = settings.HF_ENDPOINT
    retry = retry_policy()
    job.phase(DatasetStatus.DOWNLOADING, progress=0.0)
    # The commit the request resolved: the files are the ones the user was shown.
    plan = plan_dataset(dataset.repo_id, dataset.revision, dataset.split, token, endpoint, **retry, config=dataset.config)
    if dataset.storage == "stream":  # nothing downloaded: the footers, the first rows, and it is ready
        try:
            row_count, preview = stream_summary(plan, dataset.text_column, token, endpoint)
        except InvalidInput as exc:
            raise JobError(exc.code, exc.message) from None
        job.write(status=DatasetStatus.READY, progress=100.0, files=list(plan.files), row_count=row_count,
                  preview=preview, **Dataset.IDLE_FIELDS)  # fmt: skip  (the token stays, encrypted: reads need it)
        return
    job.write(bytes_total=plan.total_bytes)
    tmp = staged_path(dataset.folder)  # kept when a retry can resume it (see TrackedRow.remove_failed_files)
    ensure_free_space(tmp, plan.total_bytes, settings.DISK_RESERVE_BYTES)
    download_dataset(plan, tmp, token, endpoint, job.transfer, **retry)
    job.flush()
    try:
        dataset_files.check_file(tmp / plan.files[0], dataset.text_column)
        row_count, preview, chars = dataset_files.summarize(tmp, dataset.text_column)
    except InvalidInput as exc:
        raise JobError(exc.code, exc.message) from None
    promote(tmp, dataset.folder)
    del token
    job.write(status=DatasetStatus.READY, progress=100.0, file_path=str(dataset.folder), row_count=row_count,
              preview=preview, statistics=Dataset.statistics_record(row_count, True, chars),
              encrypted_token=None, **Dataset.IDLE_FIELDS)  # fmt: skip


def run_extraction_job(extraction_id: str, listener: Listener | None = None) -> Extraction | None:
    """`listener(extraction)` sees every state written (the command's progress bar)."""
    return run_tracked(Extraction, extraction_id, _extract, listener)


def run_dataset_import(dataset_id: str, listener: Listener | None = None) -> Dataset | None:
    return run_tracked(Dataset, dataset_id, _import_hub_dataset, listener)


def extraction_job(extraction_id: str) -> None:
    run_extraction_job(extraction_id)


def _export(export: Export, job: TrackedJob) -> None:
    extraction = export.extraction
    job.phase(ExportStatus.EXPORTING)
    check_free_space(export.out_dir, export_bytes(extraction.final_dir), settings.DISK_RESERVE_BYTES)

    def on_progress(done: int, total: int) -> None:
        job.report(100.0 * done / total, lambda: {"rows_done": done, "rows_total": total}, force=done >= total)

    try:
        paths = export_saelens(extraction.final_dir, export.out_dir, on_progress, staging=export.staging_dir, naming=export.naming,
                               shuffle=export.shuffle_seed)  # fmt: skip
    except InvalidInput as exc:  # the folder filled up, or became a file, since it was asked for
        raise JobError(exc.code, exc.message) from None
    except OSError as exc:  # disk full mid-way, a folder that cannot be written: said, not a traceback
        raise JobError("export_failed", f"The export could not be written: {exc.strerror or type(exc).__name__}.") from None
    job.flush()  # its last progress (forced: every row, rows_done = rows_total) written before the final state
    job.write(status=ExportStatus.COMPLETED, progress=100.0, paths=[str(path) for path in paths], eta_seconds=None)


def run_export_job(export_id: str, listener: Listener | None = None) -> Export | None:
    """`listener(export)` sees every state written (the command's progress bar)."""
    return run_tracked(Export, export_id, _export, listener)


def export_job(export_id: str) -> None:
    run_export_job(export_id)


def import_dataset_job(dataset_id: str) -> None:
    run_dataset_import(dataset_id)


def dataset_statistics(dataset_id: str) -> Dataset:
    """What request_dataset_statistics asked for, measured and stored on the row (its
    progress as rows read, a failure as its message: the row is never left "computing")."""
    from django.utils import timezone

    from models_app.services import get_model

    from .ml.datasets import text_statistics

    dataset = Dataset.objects.get(pk=dataset_id)
    asked = (dataset.statistics or {}).get("asked") or {}
    previous = {k: v for k, v in (dataset.statistics or {}).items() if k not in ("state", "asked", "rows_so_far", "error")}
    shown = [time.monotonic()]

    def on_rows(n: int) -> None:
        if time.monotonic() - shown[0] >= 1.0:
            shown[0] = time.monotonic()
            Dataset.objects.filter(pk=dataset_id).update(statistics={**previous, "state": "computing", "asked": asked, "rows_so_far": n})

    try:
        model = get_model(asked["model_id"]) if asked.get("model_id") else None
        tokenizer = tokenizer_for(model.weights_dir) if model else None
        limit = settings.DATASET_STATS_STREAM_ROWS if dataset.storage == "stream" else None
        found = text_statistics(dataset.texts(asked.get("reader_id")), tokenizer, limit, on_rows=on_rows)
        record = Dataset.statistics_record(found["rows"], found["complete"], found["chars"], found["tokens"], model)
    except Exception as exc:  # noqa: BLE001 - said on the row; the dataset itself is fine
        log.exception("dataset %s: statistics failed", dataset_id)
        message = exc.message if isinstance(exc, (JobError, ServiceError)) else f"{type(exc).__name__} while reading the rows."
        record = {**previous, "state": "failed", "error": message, "computed_at": timezone.now().isoformat()}
    Dataset.objects.filter(pk=dataset_id).update(statistics=record)
    dataset.refresh_from_db()
    return dataset


def dataset_statistics_job(dataset_id: str) -> None:
    try:
        dataset_statistics(dataset_id)
    except Dataset.DoesNotExist:  # deleted while queued
        pass
