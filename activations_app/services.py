"""Datasets and extractions: every state change that also enqueues, publishes or touches files."""

from __future__ import annotations

import shutil
import uuid

from django.conf import settings
from django.db import transaction

from mistudio.errors import Conflict, NotFound, ServiceError
from models_app import services as model_services
from models_app.ml.architecture import MODULE_MAPS
from models_app.ml.errors import InvalidInput
from models_app.ml.validation import resolve_import_path
from models_app.models import ModelStatus

from .ml import datasets as dataset_files
from .ml.hooks import HOOK_TYPES
from .jobs import publish, remove_output_dirs
from .models import EXTRACTION_RUNNING, Dataset, Extraction, ExtractionStatus


def _refuse(exc: InvalidInput) -> ServiceError:
    return ServiceError(exc.code, exc.message, details={"field": exc.field})


def looks_like_local_path(value: str) -> bool:
    import os

    return value.startswith(("/", ".", "~")) or os.path.exists(value)


def import_dataset(
    *, path: str, name: str | None = None, text_column: str = "text", split: str = "train", token: str | None = None
) -> Dataset:
    """A local file (inside the allowed import roots) copied into datasets/{id}/, or a Hub
    dataset repo's split downloaded there."""
    if not looks_like_local_path(path):
        return import_hub_dataset(repo_id=path, name=name, text_column=text_column, split=split, token=token)
    try:
        source = resolve_import_path(path, settings.IMPORT_ROOTS, allow_files=dataset_files.FORMATS)
        dataset_files.check_file(source, text_column)
    except InvalidInput as exc:
        raise _refuse(exc) from None
    dataset = Dataset(name=(name or source.stem)[:200], source="local", text_column=text_column, file_path="")
    _store(dataset, source)
    return dataset


def import_hub_dataset(*, repo_id: str, name: str | None, text_column: str, split: str, token: str | None) -> Dataset:
    from models_app.ml.errors import JobError
    from models_app.ml.validation import validate_repo_id, validate_revision

    from .ml.hub_datasets import download_dataset

    try:
        repo_id = validate_repo_id(repo_id)
        revision = validate_revision(None)
    except InvalidInput as exc:
        raise _refuse(exc) from None
    dataset = Dataset(name=(name or f"{repo_id}:{split}")[:200], source="hub", text_column=text_column, file_path="")
    folder = dataset.folder
    try:
        download_dataset(repo_id, revision, split, token, settings.HF_ENDPOINT, folder)
        dataset_files.check_file(next(p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() in dataset_files.FORMATS and ".cache" not in p.parts), text_column)
        row_count, preview = dataset_files.summarize(folder, text_column)
    except (JobError, InvalidInput) as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise ServiceError(exc.code, exc.message) from None
    shutil.rmtree(folder / ".cache", ignore_errors=True)
    dataset.file_path, dataset.row_count, dataset.preview = str(folder), row_count, preview
    dataset.save()
    return dataset


def _store(dataset: Dataset, source) -> None:
    dataset.folder.mkdir(parents=True, exist_ok=True)
    target = dataset.folder / f"data{source.suffix.lower()}"
    try:
        shutil.copyfile(source, target)
        row_count, preview = dataset_files.summarize(target, dataset.text_column)
    except BaseException:
        shutil.rmtree(dataset.folder, ignore_errors=True)
        raise
    dataset.file_path, dataset.row_count, dataset.preview = str(target), row_count, preview
    dataset.save()


def upload_dataset(*, upload, name: str | None = None, text_column: str = "text") -> Dataset:
    """An uploaded file (Django UploadedFile), size-limited, checked, stored."""
    import tempfile
    from pathlib import Path

    suffix = Path(upload.name or "").suffix.lower()
    if suffix not in dataset_files.FORMATS:
        raise ServiceError("invalid_file", f"Upload a {', '.join(dataset_files.FORMATS)} file.", details={"field": "file"})
    if upload.size > settings.DATASET_UPLOAD_LIMIT_BYTES:
        raise ServiceError(
            "file_too_large",
            f"The file is {upload.size / 1e6:.1f} MB; the limit is {settings.DATASET_UPLOAD_LIMIT_BYTES / 1e6:.0f} MB "
            "(MISTUDIO_DATASET_UPLOAD_LIMIT).",
            details={"field": "file"},
        )
    with tempfile.TemporaryDirectory(dir=settings.DATA_DIR) as tmp:
        staged = Path(tmp) / f"upload{suffix}"
        with staged.open("wb") as out:
            for chunk in upload.chunks():
                out.write(chunk)
        try:
            dataset_files.check_file(staged, text_column)
        except InvalidInput as exc:
            raise _refuse(exc) from None
        dataset = Dataset(name=(name or Path(upload.name).stem)[:200], source="upload", text_column=text_column, file_path="")
        _store(dataset, staged)
    return dataset


def delete_dataset(dataset_id: str) -> bool:
    dataset = Dataset.objects.filter(pk=dataset_id).first()
    if dataset is None:
        return False
    if any(e.is_running for e in dataset.extractions.all()):
        raise Conflict("dataset_in_use", f"An extraction is using {dataset.name}; cancel it first.")
    shutil.rmtree(dataset.folder, ignore_errors=True)
    dataset.delete()
    return True


def whole_number(value):
    """An ASCII decimal string as an int ("²" and "１" are not); anything else unchanged."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


def _positive_int(value, field: str, maximum: int) -> int:
    value = whole_number(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ServiceError("invalid_input", f"{field} must be a whole number.", details={"field": field})
    if not 1 <= value <= maximum:
        raise ServiceError("invalid_input", f"{field} must be between 1 and {maximum:,}.", details={"field": field})
    return value


def validate_request(model, dataset, layers, hooks, batch_size, max_samples, seq_len, dtype, tokenization) -> dict:
    """Every bound checked server-side, with the reason; nothing is queued or written before."""
    if model.status != ModelStatus.READY:
        raise Conflict("model_not_ready", f"{model.name} is {model.status}; extraction needs a ready model.")
    if model.architecture not in MODULE_MAPS:
        raise ServiceError("unsupported_architecture", f"No hook map for {model.architecture!r}.")
    if dataset.status != "ready":
        raise Conflict("dataset_not_ready", f"Dataset {dataset.name} is {dataset.status}.")
    config = model.architecture_config
    num_layers = int(config.get("num_hidden_layers") or config.get("n_layer"))
    if not isinstance(layers, list) or not layers:
        raise ServiceError("invalid_layers", "Choose at least one layer.", details={"field": "layers"})
    if any(isinstance(x, bool) or not isinstance(x, int) for x in layers):
        raise ServiceError("invalid_layers", "Layers must be whole numbers.", details={"field": "layers"})
    if len(set(layers)) != len(layers):
        raise ServiceError("invalid_layers", "Each layer may be chosen once.", details={"field": "layers"})
    bad = [x for x in layers if not 0 <= x < num_layers]
    if bad:
        raise ServiceError("invalid_layers", f"Layers {bad} are out of range 0–{num_layers - 1}.", details={"field": "layers"})
    if not isinstance(hooks, list) or not hooks or any(h not in HOOK_TYPES for h in hooks) or len(set(hooks)) != len(hooks):
        raise ServiceError("invalid_hooks", f"Hook types must be some of {', '.join(HOOK_TYPES)}.", details={"field": "hook_types"})
    max_positions = int(config.get("max_position_embeddings") or config.get("n_positions") or 2048)
    if dtype not in ("float16", "float32"):
        raise ServiceError("invalid_input", "dtype must be float16 or float32.", details={"field": "dtype"})
    if tokenization not in ("packed", "truncate"):
        raise ServiceError("invalid_input", "tokenization must be packed or truncate.", details={"field": "tokenization"})
    return {
        "layers": sorted(layers),
        "hook_types": [h for h in HOOK_TYPES if h in hooks],
        "batch_size": _positive_int(batch_size, "batch_size", settings.EXTRACTION_MAX_BATCH_SIZE),
        "max_samples": _positive_int(max_samples, "max_samples", settings.EXTRACTION_MAX_SAMPLES),
        "seq_len": _positive_int(seq_len, "seq_len", max_positions),
        "dtype": dtype,
        "tokenization": tokenization,
    }


def request_extraction(*, model_id: str, dataset_id: str, enqueue: bool = True, **fields) -> Extraction:
    model = model_services.get_model(model_id)
    dataset = Dataset.objects.filter(pk=dataset_id).first()
    if dataset is None:
        raise NotFound("dataset_not_found", f"No dataset with id {dataset_id!r}.")
    clean = validate_request(
        model, dataset, fields.get("layers"), fields.get("hook_types"), fields.get("batch_size", 32),
        fields.get("max_samples", 1000), fields.get("seq_len", 128), fields.get("dtype", "float16"),
        fields.get("tokenization", "packed"),
    )  # fmt: skip
    estimate = estimate_extraction(model, clean, dataset)
    if not estimate["fits_on_disk"]:
        raise ServiceError(
            "insufficient_disk_space",
            f"The output needs {estimate['storage_bytes'] / 1e9:.2f} GB but only "
            f"{estimate['disk_free_bytes'] / 1e9:.2f} GB is free in the data dir.",
        )
    if enqueue:
        model_services.require_queue()
    with transaction.atomic():
        # The job id is on the row before the job exists (see models_app.services).
        extraction = Extraction.objects.create(model=model, dataset=dataset, job_id=str(uuid.uuid4()) if enqueue else "", **clean)
        if enqueue:
            def enqueue_job() -> None:
                model_services.queue().enqueue(
                    "activations_app.jobs.extraction_job", extraction.id,
                    job_id=extraction.job_id, job_timeout=model_services.job_timeout(),
                )  # fmt: skip

            transaction.on_commit(enqueue_job)
    return extraction


def delete_extraction(extraction: Extraction) -> bool:
    """Remove the record and its output folder; 409 while it runs (cancel first)."""
    if extraction.is_running:
        raise Conflict("extraction_running", f"{extraction.id} is {extraction.status}; cancel it first.")
    remove_outputs(extraction)
    extraction.delete()
    return True


def remove_outputs(extraction: Extraction) -> None:
    remove_output_dirs(extraction.final_dir)


def cancel_extraction(extraction_id: str) -> Extraction:
    """Stop the worker process running it, then remove its temporary folder."""
    extraction = Extraction.objects.filter(pk=extraction_id).first()
    if extraction is None:
        raise NotFound("extraction_not_found", f"No extraction with id {extraction_id!r}.")
    if not extraction.is_running:
        raise Conflict("not_running", f"{extraction.id} is {extraction.status}; only a running extraction can be cancelled.")
    Extraction.objects.filter(pk=extraction.pk, status__in=EXTRACTION_RUNNING).update(
        status=ExtractionStatus.CANCELLED, eta_seconds=None
    )
    if extraction.job_id:
        model_services.stop_rq_job(extraction.job_id)
    remove_outputs(extraction)
    extraction = Extraction.objects.select_related("model", "dataset").get(pk=extraction.pk)
    publish(extraction)  # every open page and /ws/models/{id}/extraction client, not just the one that asked
    return extraction


ROUGH_FLOPS_PER_SECOND = {"cpu": 5e10, "cuda": 2e13}


def estimate_extraction(model, clean: dict, dataset: Dataset | None = None) -> dict:
    """Storage exactly for the rows the run will have (truncate: one per document, so at most
    the dataset's row count; packed: max_samples windows at most, fewer when the text runs
    out), time from this model's measured speed when a finished extraction of it exists
    (else a stated rough FLOP figure), memory for a batch."""
    from models_app.ml import quantize

    from .ml.extract import storage_bytes

    config = model.architecture_config
    hidden = int(config.get("hidden_size") or config.get("n_embd"))
    files = len(clean["layers"]) * len(clean["hook_types"])
    samples, at_most = clean["max_samples"], True
    if clean["tokenization"] == "truncate" and dataset is not None and dataset.row_count:
        samples, at_most = min(samples, dataset.row_count), False
    storage = storage_bytes(samples, clean["seq_len"], hidden, clean["dtype"], files, clean["tokenization"] == "truncate")
    measured = (
        Extraction.objects.filter(model=model, status=ExtractionStatus.COMPLETED, seq_len=clean["seq_len"])
        .exclude(samples_per_second=0)
        .order_by("-created_at")
        .values_list("samples_per_second", flat=True)
        .first()
    )
    device = quantize.compute_device()
    if measured:
        seconds, basis = samples / measured, f"measured {measured:.1f} samples/s on this model"
    else:
        flops = 2 * (model.params_count or 0) * samples * clean["seq_len"]
        seconds, basis = flops / ROUGH_FLOPS_PER_SECOND[device], f"rough: 2 FLOPs per parameter per token at {ROUGH_FLOPS_PER_SECOND[device]:.0e} FLOP/s on {device.upper()}"
    weights = model.memory_measured_bytes or model.memory_required_bytes or 0
    batch_bytes = clean["batch_size"] * clean["seq_len"] * hidden * 4 * (files + 8)
    free = shutil.disk_usage(settings.DATA_DIR).free
    warnings = []
    limit = model_services.job_timeout()
    if seconds > limit:
        warnings.append(
            f"This would take about {seconds / 3600:.1f} hours, past the job time limit of {limit / 3600:.0f} h "
            "(MISTUDIO_JOB_TIMEOUT), where the run is stopped and its files removed. Use fewer samples or raise the limit."
        )
    elif seconds > 3600:
        warnings.append(f"This will take about {seconds / 3600:.1f} hours.")
    if storage > 50e9:
        warnings.append(f"The output is {storage / 1e9:.0f} GB.")
    return {
        "storage_bytes": storage, "time_seconds": seconds, "time_basis": basis,
        "samples": samples, "samples_at_most": at_most, "memory_bytes": weights + batch_bytes, "disk_free_bytes": free, "fits_on_disk": storage < free,
        "warnings": warnings,
    }  # fmt: skip
