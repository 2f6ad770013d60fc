"""Datasets and extractions: every state change that also enqueues, publishes or touches
files. Models are reached only through the model lookup (`models_app.services`)."""

from __future__ import annotations

import errno
import shutil
import tempfile
from pathlib import Path

from django.conf import settings
from django.db import models, transaction

from mistudio import jobs
from mistudio.crypto import encrypt_secret
from mistudio.errors import Conflict, Forbidden, InvalidInput, JobError, NotFound, ServiceError
from mistudio.queue import job_timeout, require_queue
from mistudio.text import UNSTORABLE, storable
from mistudio.validation import bounded_int, resolve_import_path, validate_hub_source
from models_app.ml import check_architecture, compute_device, tokenizer_for
from models_app.services import fidelity_below, get_ready_model, source_precision_model

from .forms import ExtractionForm
from .ml import datasets as dataset_files
from .ml.export import FORMATS as EXPORT_FORMATS
from .ml.export import MAX_SEED, NAMINGS, check_free_space, check_out_dir, default_naming, default_out_dir, export_bytes
from .ml.extract import ExtractionSpec, file_stem, storage_bytes
from .ml.reuse import describe
from .ml.hub_datasets import check_text_column, plan_dataset
from .models import Dataset, DatasetStatus, Export, Extraction, ExtractionStatus, ExtractionTemplate

MAX_SPLIT_LENGTH = 100

# --- datasets ---------------------------------------------------------------------------


def looks_like_local_path(value: str) -> bool:
    """A path (absolute, ./relative or ~), or a name that exists in the first import folder;
    anything else is a Hub repo id. Never looked up in the server's working directory."""
    if value.startswith(("/", ".", "~")):
        return True
    roots = settings.IMPORT_ROOTS
    try:
        return bool(roots) and "\x00" not in value and (Path(roots[0]) / value).exists()
    except OSError:  # a name too long for the filesystem, and the like: not a file here
        return False


def import_dataset(
    *, path: str, name: str | None = None, text_column: str = "text", split: str = "train", token: str | None = None,
    revision: str | None = None, enqueue: bool = True, user=None, config: str | None = None, download_whole: bool = False,
) -> Dataset:  # fmt: skip
    """A local file (inside the allowed import roots) copied into datasets/{id}/ now, or a
    Hub dataset repo's split imported by a job (streamed, or downloaded whole)."""
    if not looks_like_local_path(path):
        return request_hub_dataset(repo_id=path, name=name, text_column=text_column, split=split, token=token,
                                   revision=revision, enqueue=enqueue, user=user, config=config,
                                   download_whole=download_whole)  # fmt: skip
    try:
        source = resolve_import_path(path, settings.IMPORT_ROOTS, allow_files=dataset_files.FORMATS)
        name, text_column = _dataset_fields(name, text_column, source.stem)
        dataset_files.check_file(source, text_column)
    except InvalidInput as exc:
        raise ServiceError.from_invalid(exc) from None
    dataset = Dataset(name=name, source="local", text_column=text_column, file_path="", owner=jobs.owner_of(user))
    _store(dataset, source)
    return dataset


def request_hub_dataset(
    *, repo_id: str, name: str | None, text_column: str, split: str, token: str | None, revision: str | None = None,
    enqueue: bool = True, user=None, config: str | None = None, download_whole: bool = False,
) -> Dataset:  # fmt: skip
    """The split's files are listed now (a wrong repo, subset, split or token is refused
    before any row exists). By default the files stay on the Hub: a short job reads the
    parquet footers and the first rows, and an extraction later streams only the rows it
    needs. `download_whole` keeps a local copy instead: a download job with progress and
    cancel, like a model's."""
    try:
        repo_id, revision, token = validate_hub_source(repo_id, revision, token)
    except InvalidInput as exc:
        raise ServiceError.from_invalid(exc) from None
    split = (split or "train").strip()
    if len(split) > MAX_SPLIT_LENGTH or not split.isprintable():
        raise ServiceError("invalid_input", "The split name is not valid.", details={"field": "split"})
    config = (config or "").strip()
    if len(config) > MAX_SPLIT_LENGTH or not config.isprintable() or "/" in config or config in (".", ".."):
        raise ServiceError("invalid_input", "The subset (config) name is not valid.", details={"field": "config"})
    try:
        plan = plan_dataset(repo_id, revision, split, token, settings.HF_ENDPOINT, retries=1, backoff_seconds=0, config=config)
    except JobError as exc:
        raise ServiceError(exc.code, exc.message, retryable=exc.retryable) from None
    # The default name says all that tells two imports apart: the subset, the split, and a
    # streamed import from a whole copy ("acme/data:code/test (streamed)").
    where = f"{config}/{split}" if config else split
    name, text_column = _dataset_fields(name, text_column, f"{repo_id}:{where}{'' if download_whole else ' (streamed)'}")
    try:  # a damaged file or a missing text column is known now, before any record exists
        check_text_column(plan, text_column, token, settings.HF_ENDPOINT)
    except InvalidInput as exc:
        raise ServiceError.from_invalid(exc) from None
    except JobError as exc:
        raise ServiceError(exc.code, exc.message, retryable=exc.retryable) from None
    if enqueue:
        require_queue()
    with transaction.atomic():
        dataset = Dataset.objects.create(
            name=name, source="hub", text_column=text_column, file_path="",
            status=DatasetStatus.QUEUED, repo_id=repo_id, split=split, requested_revision=revision, revision=plan.sha,
            config=config, storage="local" if download_whole else "stream", files=list(plan.files),
            bytes_total=plan.total_bytes if download_whole else 0, encrypted_token=encrypt_secret(token) if token else None,
            owner=jobs.owner_of(user),
        )  # fmt: skip
        if enqueue:
            jobs.enqueue_after_commit(dataset)
    return dataset


def _dataset_fields(name: str | None, text_column: str | None, default_name: str) -> tuple[str, str]:
    """The record's name and text column as given, refused when they cannot be stored."""
    name = (name or "").strip()[:200] or default_name[:200]
    text_column = (text_column or "text").strip()
    if not storable(name):
        raise ServiceError("invalid_text", f"The name: {UNSTORABLE}", details={"field": "name"})
    if not text_column or len(text_column) > 100 or not storable(text_column):
        raise ServiceError("invalid_input", "The text column must be a column name of 1 to 100 characters.",
                           details={"field": "text_column"})  # fmt: skip
    return name, text_column


def _refusal_for(exc: BaseException) -> ServiceError | None:
    """A failure while storing a dataset that is the file's fault or the disk's, said so."""
    if isinstance(exc, InvalidInput):
        return ServiceError.from_invalid(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return ServiceError("disk_full", "The data dir's disk is full; nothing was stored. Free some space and retry.")
    return None


def _store(dataset: Dataset, source: Path) -> None:
    """Copied into datasets/{id}/, read through once for the count and preview, then saved;
    any failure leaves no folder and no row."""
    target = dataset.folder / f"data{source.suffix.lower()}"
    try:
        dataset.folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        row_count, preview, chars = dataset_files.summarize(target, dataset.text_column)
        dataset.file_path, dataset.row_count, dataset.preview = str(target), row_count, preview
        dataset.statistics = Dataset.statistics_record(row_count, True, chars)
        dataset.save()
    except BaseException as exc:
        shutil.rmtree(dataset.folder, ignore_errors=True)
        refusal = _refusal_for(exc)
        if refusal is None:
            raise
        raise refusal from None


def upload_dataset(*, upload, name: str | None = None, text_column: str = "text", user=None) -> Dataset:
    """An uploaded file (Django UploadedFile), size-limited, checked, stored."""
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
    name, text_column = _dataset_fields(name, text_column, Path(upload.name).stem)
    with tempfile.TemporaryDirectory(dir=settings.DATA_DIR) as tmp:
        staged = Path(tmp) / f"upload{suffix}"
        try:
            with staged.open("wb") as out:
                for chunk in upload.chunks():
                    out.write(chunk)
            dataset_files.check_file(staged, text_column)
        except (InvalidInput, OSError) as exc:
            refusal = _refusal_for(exc)
            if refusal is None:
                raise
            raise refusal from None
        dataset = Dataset(name=name, source="upload", text_column=text_column, file_path="", owner=jobs.owner_of(user))
        _store(dataset, staged)
    return dataset


def cancel_dataset(dataset_id: str, user) -> Dataset:
    return jobs.cancel(Dataset, dataset_id, user)


def retry_dataset(dataset_id: str, user, token: str | None = None, text_column: str | None = None) -> Dataset:
    """A failed or cancelled Hub import again, resuming from the bytes it left; with
    `text_column`, reading that column instead (the fix for a wrong one)."""
    if text_column is not None:
        _, text_column = _dataset_fields(None, text_column, "-")
        dataset = Dataset.get_or_404(dataset_id)
        dataset.check_may_change(user, "retry")
        if dataset.is_running:
            raise Conflict("not_retryable", f"{dataset.label} is {dataset.status}; only a failed or cancelled import can be retried.")
        Dataset.objects.filter(pk=dataset_id).exclude(status__in=Dataset.RUNNING).update(text_column=text_column)
    return jobs.retry(Dataset, dataset_id, user, token)


def delete_dataset(dataset_id: str, user) -> bool:
    return jobs.delete(Dataset, dataset_id, user)


# --- extractions ------------------------------------------------------------------------


def validate_extraction(model, data) -> ExtractionSpec:
    """The request (form fields, a JSON body, command options) as the spec the job runs;
    every bound checked, with the reason, before anything is queued or written."""
    try:
        check_architecture(model.architecture_config or {"model_type": model.architecture})
    except JobError as exc:
        raise ServiceError("unsupported_architecture", exc.message) from None
    return ExtractionForm(data, model=model).spec()


def _refuse_unless_it_fits(estimate: dict) -> None:
    if not estimate["fits_on_disk"]:
        raise ServiceError(
            "insufficient_disk_space",
            f"The output needs {estimate['storage_bytes'] / 1e9:.2f} GB but only "
            f"{estimate['disk_free_bytes'] / 1e9:.2f} GB is free in the data dir.",
        )


def estimate_request(*, model_id: str, dataset_id: str, data) -> dict:
    """The dialog's live estimate: the same checks as a start, nothing written."""
    model = get_ready_model(model_id, "extraction")
    if not dataset_id:
        raise ServiceError("invalid_input", "Choose a dataset.", details={"field": "dataset_id"})
    dataset = Dataset.get_ready_or_409(dataset_id, "extraction")
    spec = validate_extraction(model, data)
    estimate = estimate_extraction(model, spec, dataset)
    low = fidelity_below(model, [(layer, hook) for layer in spec.layers for hook in spec.hook_types])
    if low:
        source = source_precision_model(model)
        estimate["fidelity"] = {"low": low, "threshold": settings.FIDELITY_COSINE_WARN,
                                "source": {"id": source.id, "label": f"{source.name} {source.quantization}"} if source else None}  # fmt: skip
    return estimate


def request_extraction(*, model_id: str, dataset_id: str, enqueue: bool = True, data=None, user=None, **fields) -> Extraction:
    """`data` as a form posts it, or the request's fields as keywords."""
    data = fields if data is None else data
    model = get_ready_model(model_id, "extraction")
    dataset = Dataset.get_ready_or_409(dataset_id, "extraction")
    owner = jobs.owner_of(user)
    refusal = dataset.stream_refusal(owner.pk if owner else None)
    if refusal:
        raise Forbidden("gated_token_required", refusal)
    spec = validate_extraction(model, data)
    _refuse_unless_it_fits(estimate_extraction(model, spec, dataset))
    if enqueue:
        require_queue()
    with transaction.atomic():  # refused by placement (no worker can load the model): nothing is kept
        extraction = Extraction.objects.create(model=model, dataset=dataset, owner=owner, **spec.request(),
                                               **Extraction.labels_for(model, dataset))  # fmt: skip
        where = jobs.queue_for(extraction)
        if enqueue:
            jobs.enqueue_after_commit(extraction, where)
    return extraction


def retry_extraction(extraction_id: str, user) -> Extraction:
    """A failed or cancelled extraction run again from the start, with the same request."""
    return jobs.retry(Extraction, extraction_id, user)


def resume_extraction(extraction_id: str, user, enqueue: bool = True) -> Extraction:
    """A stopped extraction (worker killed, time limit, a cancel that kept its files) goes on
    from its last durable batch; the finished files are those of an uninterrupted run."""
    return jobs.resume(Extraction, extraction_id, user, enqueue=enqueue)


def export_extraction(extraction_id: str, user, fmt: str = "saelens", enqueue: bool = True, out: Path | None = None,
                      naming: str | None = None, shuffle=None) -> Export:  # fmt: skip
    """An export of a finished extraction in a trainer's format (SAELens: `datasets` per
    hook) into its own `extraction_{id}/{format}/`, or into `out` (a new or empty folder
    outside it): a tracked job, queued for a worker or (`enqueue=False`) left for the caller
    to run. Refused before anything is written: a folder that is not new or empty, too little
    free space, or an export of the same extraction and format still running (409). Anyone
    may export: it reads the extraction and writes beside it. `shuffle`: a seed (0 to
    2^32 - 1) that permutes the rows across the whole export; none keeps text order."""
    extraction = Extraction.get_or_404(extraction_id)
    try:
        shuffle = bounded_int(shuffle, "shuffle", 0, MAX_SEED, label="The shuffle seed")
    except InvalidInput as exc:
        raise ServiceError.from_invalid(exc) from None
    if fmt not in EXPORT_FORMATS:
        raise ServiceError("invalid_input", f"format must be one of {', '.join(EXPORT_FORMATS)}.", details={"field": "format"})
    naming = naming or default_naming(_exported_repo(extraction))[0]
    if naming not in NAMINGS:
        raise ServiceError("invalid_input", f"naming must be one of {', '.join(NAMINGS)}.", details={"field": "naming"})
    if extraction.status != ExtractionStatus.COMPLETED or not extraction.final_dir.is_dir():
        raise Conflict("not_completed", f"{extraction.label} is {extraction.status}; only a completed extraction can be exported.")
    try:
        target = check_out_dir(extraction.final_dir, out or default_out_dir(extraction.final_dir, fmt), fmt)
        check_free_space(target, export_bytes(extraction.final_dir), settings.DISK_RESERVE_BYTES)
    except InvalidInput as exc:
        raise ServiceError.from_invalid(exc) from None
    except JobError as exc:
        raise ServiceError(exc.code, exc.message) from None
    if enqueue:
        require_queue()
    with transaction.atomic():
        _refuse_a_second_export(extraction, fmt)
        export = Export.objects.create(extraction=extraction, format=fmt, naming=naming, shuffle_seed=shuffle, out_path=str(target),
                                       owner=jobs.owner_of(user))  # fmt: skip
        if enqueue:
            jobs.enqueue_after_commit(export)
    return export


def _exported_repo(extraction: Extraction) -> str | None:
    """The Hub repo of the model an extraction ran, as its metadata.json recorded it (the
    model's row may be gone)."""
    import json

    try:
        return json.loads((extraction.final_dir / "metadata.json").read_text()).get("model", {}).get("repo_id")
    except (OSError, ValueError, AttributeError):
        return extraction.model.repo_id if extraction.model is not None else None


def default_export_naming(extraction_id: str) -> tuple[str, str]:
    """The hook naming an export of this extraction gets when none is asked for, and why."""
    return default_naming(_exported_repo(Extraction.get_or_404(extraction_id)))


def cancel_export(export_id: str, user) -> Export:
    return jobs.cancel(Export, export_id, user)


def retry_export(export_id: str, user) -> Export:
    """Run a failed or cancelled export again, into the same folder (still new or empty);
    refused like a new one while another export of the extraction and format runs."""
    export = Export.get_or_404(export_id)
    try:
        check_out_dir(export.extraction.final_dir, export.out_dir, export.format)
    except InvalidInput as exc:
        raise ServiceError.from_invalid(exc) from None
    with transaction.atomic():
        _refuse_a_second_export(export.extraction, export.format)
        return jobs.retry(Export, export_id, user)


def _refuse_a_second_export(extraction: Extraction, fmt: str) -> None:
    """One export per extraction and format at a time: decided under a lock on the extraction's
    row (inside the caller's transaction), so two requests at once cannot both start one."""
    Extraction.objects.select_for_update().filter(pk=extraction.pk).first()
    running = Export.objects.filter(extraction=extraction, format=fmt, status__in=Export.RUNNING).first()
    if running is not None:
        raise Conflict("export_running", f"An export of {extraction.label} for {running.format_label} is already "
                                         f"{running.status} ({running.id}); wait for it, or cancel it first.",
                       details={"export_id": running.id})  # fmt: skip


def cancel_extraction(extraction_id: str, user, keep: bool = False) -> Extraction:
    """Stop the worker process running it, then remove its temporary folder; every open
    page and /ws/models/{id}/extraction client hears of it, not just the one that asked."""
    return jobs.cancel(Extraction, extraction_id, user, keep=keep)


def delete_extraction(extraction_id: str, user) -> bool:
    """Remove the record and its output folder (see mistudio.jobs.delete)."""
    return jobs.delete(Extraction, extraction_id, user)


ROUGH_FLOPS_PER_SECOND = {"cpu": 5e10, "cuda": 2e13}
# How many tokens of a dataset the estimate reads to count the rows it yields: beyond
# this, a dataset counts as large enough for any request (and the estimate says "at most").
ESTIMATE_TOKEN_BUDGET = 1_000_000
_AVAILABLE: dict[tuple, int | None] = {}


def dataset_tokenization(dataset_id: str, model_id: str, user=None) -> dict:
    """How a ready model's tokenizer reads the dataset's first rows, whole (not the cut
    preview): tokens per row, the first row's pieces, and whether the tokenizer itself puts
    a BOS first."""
    from itertools import islice

    dataset = Dataset.get_or_404(dataset_id)
    model = get_ready_model(model_id, "read a dataset with its tokenizer")
    try:
        tokenizer = tokenizer_for(model.weights_dir)
    except (OSError, ValueError) as exc:
        raise ServiceError("tokenizer_unreadable", f"{model.name} has no readable tokenizer ({type(exc).__name__}).") from None
    try:
        rows = list(islice(dataset.texts(getattr(user, "pk", None)), len(dataset.preview) or 5))
    except JobError as exc:
        raise ServiceError(exc.code, exc.message) from None
    plain = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rows]
    first = tokenizer(rows[0], add_special_tokens=True)["input_ids"] if rows else []  # as an extraction's row starts
    chars = sum(len(text) for text in rows)
    tokens = sum(len(ids) for ids in plain)
    return {
        "model": model, "rows": [{"text": text, "tokens": len(ids)} for text, ids in zip(rows, plain)],
        # Each token as the text it stands for (byte-level BPE writes a space as Ġ and a newline
        # as Ċ in its vocabulary): spaces shown as ·, newlines as ↵, so a piece is never blank.
        "pieces": [tokenizer.decode([token]).replace(" ", "·").replace("\n", "↵") or "∅" for token in first[:64]],
        "more_pieces": max(0, len(first) - 64),
        "adds_bos": bool(first and tokenizer.bos_token_id is not None and first[0] == tokenizer.bos_token_id),
        "bos_token": tokenizer.bos_token, "chars_per_token": chars / tokens if tokens else None,
    }  # fmt: skip


def samples_available(model, dataset: Dataset, spec: ExtractionSpec) -> int | None:
    """The rows this dataset yields at this sequence length, tokenization and BOS, with the
    model's own tokenizer, when it yields fewer than ESTIMATE_TOKEN_BUDGET tokens' worth;
    None when it holds more (or is streamed from the Hub, which is not read for an
    estimate). Cached per dataset content, tokenizer and settings."""
    from .ml.tokens import tokenize

    if dataset.storage == "stream" or not dataset.file_path:
        return None
    key = (dataset.id, str(dataset.source_fingerprint()), str(model.weights_dir), spec.seq_len, spec.tokenization,
           spec.prepend_bos, spec.separator)  # fmt: skip
    if key not in _AVAILABLE:
        limit = max(1, ESTIMATE_TOKEN_BUDGET // spec.seq_len)
        try:
            tokenizer = tokenizer_for(model.weights_dir)
            rows = len(tokenize(dataset.texts(), tokenizer, spec.seq_len, spec.tokenization, limit + 1, spec.prepend_bos,
                                spec.separator).ids)  # fmt: skip
        except (JobError, InvalidInput, OSError, ValueError):
            return None  # the start refuses it with the reason; the estimate stays rough
        _AVAILABLE[key] = rows if rows <= limit else None
    return _AVAILABLE[key]


def _measured_speed(model, seq_len: int) -> tuple[float, str] | None:
    """How fast finished extractions ran here, as parameter-tokens per second (samples/s ×
    sequence length × the model's parameters), with how it was found: this model at this
    length first, then this model at another length, then the latest of any model here
    (scaled by parameters and tokens: still measured on this machine, unlike the rough FLOP
    figure). None when nothing has finished here."""
    finished = (Extraction.objects.filter(status=ExtractionStatus.COMPLETED, samples_per_second__gt=0)
                .exclude(model=None).select_related("model").order_by("-created_at"))  # fmt: skip
    for narrowed, how in ((finished.filter(model=model, seq_len=seq_len), "this model"),
                          (finished.filter(model=model), "this model"), (finished, None)):  # fmt: skip
        run = narrowed.only("samples_per_second", "seq_len", "model__params_count", "model__name", "model__quantization").first()
        if run is not None and run.model.params_count:
            rate = run.samples_per_second * run.seq_len * run.model.params_count
            scaled = "" if (how and run.seq_len == seq_len) else (" scaled by tokens" if how else " scaled by parameters × tokens")
            source = how or f"{run.model.name} {run.model.quantization}"
            return rate, f"measured {run.samples_per_second:.1f} samples/s at {run.seq_len} tokens on {source}{scaled}"
    return None


def estimate_extraction(model, spec: ExtractionSpec, dataset: Dataset | None = None) -> dict:
    """Storage exactly for the rows the run will have (truncate: one per document, so at most
    the dataset's row count; packed: max_samples windows at most, fewer when the text runs
    out), time from this model's measured speed when a finished extraction of it exists
    (else a stated rough FLOP figure), memory for a batch."""
    hidden = model.hidden_size
    samples, at_most = spec.max_samples, True
    available = samples_available(model, dataset, spec) if dataset is not None else None
    if available is not None:  # counted with the model's tokenizer: exactly this many rows
        samples, at_most = min(samples, available), False
    elif spec.tokenization == "truncate" and dataset is not None and dataset.row_count:
        samples, at_most = min(samples, dataset.row_count), False
    requested = [file_stem(layer, hook) for layer in spec.layers for hook in spec.hook_types]
    reused, linked = reusable_files(model, dataset, spec, samples, at_most)
    # A file of as many rows is a hard link (no new space); one of more rows gives a copy of its first rows.
    files = len(requested) - len(linked)
    storage = storage_bytes(samples, spec.seq_len, hidden, spec.dtype, files, spec.tokenization == "truncate")
    device = compute_device()
    measured = _measured_speed(model, spec.seq_len)
    if len(reused) == len(requested):
        seconds, basis = 1.0, "every file reused: no forward pass"
    elif measured:
        rate, basis = measured  # parameter-tokens per second
        seconds = samples * spec.seq_len * (model.params_count or 0) / rate
    else:
        flops = 2 * (model.params_count or 0) * samples * spec.seq_len
        seconds, basis = flops / ROUGH_FLOPS_PER_SECOND[device], f"rough: 2 FLOPs per parameter per token at {ROUGH_FLOPS_PER_SECOND[device]:.0e} FLOP/s on {device.upper()}"
    weights = model.memory_measured_bytes or model.memory_required_bytes or 0
    batch_bytes = spec.batch_size * spec.seq_len * hidden * 4 * (files + 8)
    free = shutil.disk_usage(settings.DATA_DIR).free
    warnings = []
    limit = job_timeout()
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
        "warnings": warnings, "reuse": describe(spec.layers, spec.hook_types, reused) if reused else "",
    }  # fmt: skip


def reusable_files(model, dataset: Dataset | None, spec: ExtractionSpec, samples: int, at_most: bool) -> tuple[set[str], set[str]]:
    """The request's files that finished extractions of the same model, dataset and
    tokenization already hold for at least as many rows (the job compares the rows
    themselves before taking any), and of those the ones of exactly as many rows."""
    if dataset is None:
        return set(), set()
    requested = {file_stem(layer, hook) for layer in spec.layers for hook in spec.hook_types}
    reused, linked = set(), set()
    for source in Extraction.reuse_sources(model.id, dataset.id, spec):
        # Its rows are this request's first ones when it has at least as many (a count
        # known exactly) or asked for at least as many from the same text.
        enough = source.samples_total >= samples if not at_most else source.max_samples >= spec.max_samples
        if not enough:
            continue
        held = {file_stem(layer, hook) for layer in source.layers for hook in source.hook_types} & requested
        reused |= held
        if (source.samples_total == samples) if not at_most else (source.max_samples == spec.max_samples):
            linked |= held
    return reused, linked


# Extraction templates: a request saved by name, loaded into the dialog again.
TEMPLATE_NAME_MAX = 100


def _owner_filter(user) -> dict:
    return {"owner": user if user is not None and user.is_authenticated else None}


def list_templates(user) -> list[ExtractionTemplate]:
    """The acting user's templates, favourites first (the operator at the shell: the ones
    made there)."""
    return list(ExtractionTemplate.objects.filter(**_owner_filter(user)))


def get_template(template_id: str, user) -> ExtractionTemplate:
    """One of the acting user's templates, by id or by name."""
    if not isinstance(template_id, str) or not template_id or not storable(template_id):
        raise NotFound("template_not_found", "Choose one of your extraction templates.")
    found = ExtractionTemplate.objects.filter(**_owner_filter(user)).filter(
        models.Q(pk=template_id) | models.Q(name=template_id)).first()  # fmt: skip
    if found is None:
        raise NotFound("template_not_found", f"No extraction template {template_id!r} of yours.")
    return found


def save_template(*, model_id: str, name: str, data, user, favourite: bool | None = None) -> ExtractionTemplate:
    """The request as the dialog would start it (validated against this model), under a
    name; saving under a name one already has replaces that template."""
    name = (name or "").strip() if isinstance(name, str) else ""
    if not name or len(name) > TEMPLATE_NAME_MAX or not storable(name):
        raise ServiceError("invalid_input", f"A template needs a name of 1 to {TEMPLATE_NAME_MAX} characters. "
                                            f"{UNSTORABLE if name and not storable(name) else ''}".strip(),
                           details={"field": "name"})  # fmt: skip
    model = get_ready_model(model_id, "an extraction template")
    request = validate_extraction(model, data).request()
    with transaction.atomic():
        template, created = ExtractionTemplate.objects.select_for_update().get_or_create(
            **_owner_filter(user), name=name, defaults={"request": request, "favourite": bool(favourite)})
        if not created:
            template.request = request
            if favourite is not None:
                template.favourite = favourite
            template.save()
    return template


def favourite_template(template_id: str, user, favourite: bool | None) -> ExtractionTemplate:
    """Mark it a favourite or not; None turns it over (the dialog's star)."""
    template = get_template(template_id, user)
    template.favourite = not template.favourite if favourite is None else favourite
    template.save(update_fields=["favourite", "updated_at"])
    return template


def delete_template(template_id: str, user) -> ExtractionTemplate:
    """Delete one of the acting user's templates (by id or name); the deleted template."""
    template = get_template(template_id, user)
    template.delete()
    return template


def template_for_model(template: ExtractionTemplate, model) -> tuple[dict, list[int]]:
    """The template's request for this model's dialog, and the layers it lacks (left out)."""
    layers = [layer for layer in template.request.get("layers", []) if layer < model.num_layers]
    dropped = [layer for layer in template.request.get("layers", []) if layer >= model.num_layers]
    return {**template.request, "layers": layers}, dropped


SAMPLES_PER_PAGE = 10


def request_dataset_statistics(dataset_id: str, user, model_id: str = "", enqueue: bool = True) -> Dataset:
    """Measure the dataset as a job: rows and characters per row over every row (a
    Hub-streamed split: its first DATASET_STATS_STREAM_ROWS rows, said so), and tokens per
    row with `model_id`'s tokenizer when one is given. The last figures stay shown meanwhile."""
    import uuid

    from django.utils import timezone

    from mistudio import queue

    dataset = Dataset.get_or_404(dataset_id)
    if dataset.status != DatasetStatus.READY:
        raise Conflict("dataset_not_ready", f"{dataset.name} is {dataset.status}; statistics need a ready dataset.")
    model = get_ready_model(model_id, "count a dataset's tokens") if model_id else None
    refusal = dataset.stream_refusal(getattr(user, "pk", None))
    if refusal:
        raise Forbidden("gated_token_required", refusal)
    if enqueue:
        require_queue()
    job_id = f"dataset-statistics-{uuid.uuid4()}" if enqueue else None
    asked = {"model_id": model.id if model else None, "reader_id": getattr(user, "pk", None), "at": timezone.now().isoformat(),
             "job_id": job_id}  # fmt: skip
    Dataset.objects.filter(pk=dataset.pk).update(statistics={**(dataset.statistics or {}), "state": "computing",
                                                             "asked": asked, "rows_so_far": 0})  # fmt: skip
    if enqueue:
        transaction.on_commit(lambda: queue.enqueue("activations_app.jobs.dataset_statistics_job", dataset.pk, job_id))
    dataset.refresh_from_db()
    return dataset


def dataset_samples(dataset_id: str, user, page: int = 1) -> dict:
    """A page of whole rows (SAMPLES_PER_PAGE), read in order from the stored file or the Hub."""
    from itertools import islice

    dataset = Dataset.get_or_404(dataset_id)
    start = (page - 1) * SAMPLES_PER_PAGE
    try:
        rows = list(islice(dataset.texts(getattr(user, "pk", None)), start, start + SAMPLES_PER_PAGE + 1))
    except JobError as exc:
        raise ServiceError(exc.code, exc.message) from None
    shown = rows[:SAMPLES_PER_PAGE]
    return {"dataset": dataset, "rows": [{"number": start + i + 1, "text": text, "chars": len(text)} for i, text in enumerate(shown)],
            "first_number": start + 1, "last_number": start + len(shown),
            "page": page, "next_page": page + 1 if len(rows) > SAMPLES_PER_PAGE else None,
            "previous_page": page - 1 if page > 1 else None}  # fmt: skip
