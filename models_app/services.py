"""Every state change of a Model that also enqueues, publishes or touches files.

Views, the API and the management commands all come through here.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
import uuid

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from mistudio import capacity, jobs, queue
from mistudio.crypto import encrypt_secret
from mistudio.errors import Conflict, InvalidInput, JobError, ServiceError
from mistudio.hub import format_bytes
from mistudio.queue import require_queue
from mistudio.validation import resolve_import_path, validate_hub_source

from .ml import architecture as architecture_view
from .ml import hub, loading, quantize
from .ml.formats import validate_format
from .models import Model, ModelStatus, format_judge

log = logging.getLogger(__name__)


def request_download(
    *, user, repo_id: str, quantization: str, token: str | None = None, revision: str | None = None, enqueue=True,
    allow_duplicate: bool = False,
) -> Model:
    """Validate, create the row and (unless the caller runs it inline) queue the download.
    The same repo, revision and format already here (and not failed) is refused with a 409
    that names it, unless asked for again (`allow_duplicate`)."""
    try:
        repo_id, revision, token = validate_hub_source(repo_id, revision, token)
        fmt = validate_format(quantization)
    except InvalidInput as exc:
        raise ServiceError.from_invalid(exc) from None
    if not allow_duplicate:
        same = (Model.objects.filter(repo_id=repo_id, requested_revision=revision, requested_quantization=fmt)
                .exclude(status__in=(ModelStatus.ERROR, ModelStatus.CANCELLED)).first())  # fmt: skip
        if same is not None:
            raise Conflict("duplicate_download", f"{repo_id} {fmt}{f' at {revision}' if revision else ''} is already here "
                                                 f"({same.id}, {same.status}). Download it again anyway?",
                           details={"existing_id": same.id, "repo_id": repo_id})  # fmt: skip
    if enqueue:
        require_queue()
    with transaction.atomic():
        model = Model.objects.create(
            name=repo_id.split("/")[-1],
            repo_id=repo_id,
            requested_revision=revision,
            source="hub",
            quantization=fmt,
            requested_quantization=fmt,
            encrypted_token=encrypt_secret(token) if token else None,
            token_given=bool(token),
            owner=jobs.owner_of(user),
        )
        if enqueue:
            jobs.enqueue_after_commit(model, _download_queue(repo_id, revision, token, fmt))
    return model


def request_import(*, user, path: str, name: str | None = None, enqueue=True) -> Model:
    try:
        resolved = resolve_import_path(path, settings.IMPORT_ROOTS)
    except InvalidInput as exc:
        raise ServiceError.from_invalid(exc) from None
    if enqueue:
        require_queue()
    source = "gguf" if resolved.is_file() else "local"
    config = _local_config(resolved) if source == "local" else None
    where = placement(config, "FP32").queue if config else capacity.SHARED_QUEUE
    default_name = resolved.stem if source == "gguf" else resolved.name
    with transaction.atomic():
        model = Model.objects.create(
            name=(name or "").strip()[:200] or default_name,
            source=source,
            source_path=str(resolved),
            owner=jobs.owner_of(user),
        )
        if enqueue:
            jobs.enqueue_after_commit(model, where)
    return model


def request_quantize(*, user, model_id: str, quantization: str, enqueue=True) -> Model:
    """A new record for `quantization`, made from the stored snapshot of a ready model."""
    source = get_model(model_id)
    try:
        fmt = validate_format(quantization)
    except InvalidInput as exc:
        raise ServiceError.from_invalid(exc) from None
    if not source.is_ready:
        raise Conflict("model_not_ready", f"{source.name} is {source.status}; only a ready model can be quantized.")
    if fmt == source.quantization:
        raise ServiceError(
            "same_format", f"{source.name} already is {fmt}; pick another format.", details={"field": "quantization"}
        )
    if not source.raw_dir.is_dir():
        raise Conflict("snapshot_missing", f"The stored snapshot of {source.name} is gone; download it again.")
    if enqueue:
        require_queue()
    with transaction.atomic():  # refused by placement (no worker can make and hold it): nothing is kept
        model = Model.objects.create(
            name=source.name,
            repo_id=source.repo_id,
            revision=source.revision,
            requested_revision=source.requested_revision,
            source=source.source,
            source_path=source.source_path,
            snapshot_of=source.snapshot_owner,
            architecture=source.architecture,
            params_count=source.params_count,
            architecture_config=source.architecture_config,
            perplexity_baseline=source.perplexity_baseline,
            quantization=fmt,
            requested_quantization=fmt,
            owner=jobs.owner_of(user),
        )
        where = jobs.queue_for(model)
        if enqueue:
            jobs.enqueue_after_commit(model, where)
    return model


def architecture(model_id: str) -> dict:
    model = get_model(model_id)
    if not model.architecture_config:
        raise Conflict("model_not_ready", f"{model.name} has no config yet ({model.status}).")
    try:
        return architecture_view.describe(model.architecture_config)
    except JobError as exc:
        raise ServiceError(exc.code, exc.message) from None


_ESTIMATE_CACHE: dict[tuple, tuple[float, dict, dict]] = {}
ESTIMATE_TTL_SECONDS = 600


def estimate_repo(*, repo_id: str, revision: str | None = None, token: str | None = None) -> dict:
    """Parameters, memory and disk per format for a Hub repo, from its config and file
    sizes only (no weights fetched). Cached for ten minutes per repo and revision."""
    result, config = _repo_facts(repo_id, revision, token)
    workers = capacity.reported_workers()  # read once for the five formats
    placement = {fmt: _placement_summary(config, fmt, workers) for fmt in quantize.FORMATS_SMALLEST_LAST}
    return {**result, "placement": placement, "small_model_note": _small_model_note(result["memory"]),
            "machine_note": _machine_note(placement, result["memory"]), **_disk_note(result)}  # fmt: skip


def _machine_note(placement: dict[str, dict], memory: dict[str, int]) -> str:
    """What the workers here can make of the repo, format by format, before anything is fetched."""
    as_asked = [fmt for fmt, where in placement.items() if where["fits"] and where["made_as"] == fmt]
    smaller = {fmt: where["made_as"] for fmt, where in placement.items() if where["fits"] and where["made_as"] != fmt}
    if not as_asked and not smaller:
        return "No format of it fits the memory of any worker here."
    parts = [f"makes {', '.join(as_asked)} as asked" if as_asked else "makes no format as asked"]
    parts += [f"{fmt} would be made as {made}" for fmt, made in smaller.items()]
    streamed = [fmt for fmt in quantize.STREAMED_FORMATS if fmt in as_asked and placement[fmt]["device"] == "cpu"]
    if streamed and "FP16" in smaller:  # quantize.stream_plan
        parts.append(f"{' and '.join(streamed)} {'are' if len(streamed) > 1 else 'is'} quantized tensor by tensor from the "
                     f"shards, so FP16 (which needs {format_bytes(memory['FP16'])} loaded) is never in memory at once")  # fmt: skip
    return "This machine " + "; ".join(parts) + "."


def _disk_note(result: dict) -> dict:
    """The disk the download takes beside what is free in the data dir (kept free: the reserve)."""
    settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(settings.DATA_DIR).free
    need = result["download_bytes"] + settings.DISK_RESERVE_BYTES
    return {"disk_free": free, "disk_short": need > free}


def _small_model_note(memory: dict[str, int]) -> str | None:
    """Said when 8/4/2 bits would save little: in a tiny model the embeddings, norms and
    the layers kept in full precision outweigh the quantized linear layers."""
    if not memory.get("FP16") or memory.get("Q4", 0) < 0.75 * memory["FP16"]:
        return None
    saved = 100 * (1 - memory["Q4"] / memory["FP16"])
    return (f"Quantizing saves little here: Q4 needs {saved:.0f} % less than FP16"
            f"{'' if saved > 0 else ' (or more)'}, because this model is small enough that the parts kept in full precision "
            "(embeddings, norms, the output layer) outweigh its quantized linear layers. FP16 is the better choice.")


def _placement_summary(config: dict, fmt: str, workers: list[capacity.Capacity]) -> dict:
    """Which worker a download of `fmt` would count on, or why none can hold it."""
    try:
        where = capacity.place(format_judge(config, fmt), workers)
    except ServiceError as exc:
        return {"fits": False, "queue": None, "note": exc.message}
    worker = where.capacity
    made, _ = quantize.choose_format(fmt, quantize.memory_estimate(config, worker.device), worker.budget_bytes, worker.device)
    return {"fits": True, "queue": where.queue, "note": where.note, "made_as": made, "device": worker.device}


def _repo_facts(repo_id: str, revision: str | None, token: str | None) -> tuple[dict, dict]:
    """The estimate and the config it was made from."""
    try:
        repo_id, revision, token = validate_hub_source(repo_id, revision, token)
    except InvalidInput as exc:
        raise ServiceError.from_invalid(exc) from None
    # Per token (hashed, never kept in clear): a gated repo's config read with one user's
    # token must not answer another user who has no access.
    key = (settings.HF_ENDPOINT, repo_id, revision, hashlib.sha256(token.encode()).hexdigest() if token else None)
    cached = _ESTIMATE_CACHE.get(key)
    if cached and time.monotonic() - cached[0] < ESTIMATE_TTL_SECONDS:
        return cached[1], cached[2]
    retry = {"retries": 1, "backoff_seconds": 0}
    try:
        plan = hub.plan_download(repo_id, revision, token, settings.HF_ENDPOINT, **retry)
        config = hub.fetch_config(plan, token, settings.HF_ENDPOINT)
        architecture = loading.check_architecture(config)
    except JobError as exc:
        raise ServiceError(exc.code, exc.message, retryable=exc.retryable) from None
    device = quantize.compute_device()
    weights = sum(size for name, size in plan.file_sizes.items() if name in plan.files and name.endswith((".safetensors", ".bin")))
    sidecars = plan.total_bytes - weights
    disk = {fmt: quantize.estimate_weight_bytes(config, fmt, device) + sidecars for fmt in quantize.FORMATS_SMALLEST_LAST}
    disk["FP32"] = plan.total_bytes  # as stored in the repo
    result = {
        "repo_id": repo_id,
        "revision": plan.sha,
        "architecture": architecture,
        "params_count": loading.count_parameters(config),
        "download_bytes": plan.total_bytes,
        "memory": quantize.memory_estimate(config, device),
        "disk": disk,
        "device": device,
    }
    _ESTIMATE_CACHE[key] = (time.monotonic(), result, config)
    return result, config


def _local_config(folder) -> dict | None:
    try:
        return loading.read_config(folder)
    except JobError:
        return None  # the job refuses it, with the reason


def _download_queue(repo_id: str, revision: str | None, token: str | None, fmt: str) -> str:
    """Where a download goes. With workers of one class, their queue (the config is judged by
    the job); with several, the one whose budget holds the model, judged from the repo's
    config now (the dialog's estimate is cached). The Hub not answering leaves it to the
    shared queue, and the job says what went wrong."""
    workers = capacity.reported_workers()
    queues = {worker.queue for worker in workers}
    if len(queues) <= 1:
        return next(iter(queues), capacity.SHARED_QUEUE)
    try:
        _, config = _repo_facts(repo_id, revision, token)
    except ServiceError:
        return capacity.SHARED_QUEUE
    return capacity.place(format_judge(config, fmt), workers).queue


def placement(config: dict, fmt: str) -> capacity.Placement:
    """The device-class queue of a live worker that can make and hold `fmt`; refused up
    front, naming every worker's budget, when none can (even the smallest format)."""
    return capacity.place(format_judge(config, fmt))


# --- lookup, cancel and delete ---------------------------------------------------------


def get_model(model_id: str) -> Model:
    """The model lookup other apps use (404 as a ServiceError)."""
    return Model.get_or_404(model_id)


def ready_models(limit: int = 200) -> list[Model]:
    """The models that can be used now, newest first (a chooser's options)."""
    return list(Model.objects.filter(status=ModelStatus.READY)[:limit])


def get_ready_model(model_id: str, purpose: str) -> Model:
    """A model that can be used now, or a 409 that says why not."""
    return Model.get_ready_or_409(model_id, purpose)


def cancel_model(model_id: str, user) -> Model:
    return jobs.cancel(Model, model_id, user)


def retry_model(model_id: str, user, token: str | None = None) -> Model:
    """A failed or cancelled model's job again; a download resumes from the bytes it left."""
    return jobs.retry(Model, model_id, user, token)


def delete_model(model_id: str, user) -> bool:
    """Remove the record and every file of it (see mistudio.jobs.delete)."""
    return jobs.delete(Model, model_id, user)


def request_verify(model_id: str, user, enqueue: bool = True) -> Model:
    """Re-check a ready model's raw snapshot against the SHA-256 each file had when it
    arrived (the Hub's own, checked then): a job, since a 26 GB snapshot takes minutes to read."""
    model = Model.get_ready_or_409(model_id, "verified")
    model.check_may_change(user, "verify")
    if enqueue:
        require_queue()
    job_id = f"verify-{uuid.uuid4()}" if enqueue else None
    Model.objects.filter(pk=model.pk).update(verification={"state": "checking", "asked_at": timezone.now().isoformat(), "job_id": job_id})
    model.refresh_from_db()
    if enqueue:
        transaction.on_commit(lambda: queue.enqueue("models_app.jobs.verify_model_job", model.pk, job_id))
    model.publish()
    return model


def compare_models(a_id: str, b_id: str, max_tokens: int | None = None) -> dict:
    """Fidelity of B against A (models_app.ml.fidelity) for any two ready models of the same
    architecture and shape (a model and its fine-tune, two formats): A's pass is written to a
    temporary folder and A freed before B is loaded, so one model is held at a time. The
    text is tokenized with A's tokenizer for both."""
    import tempfile
    from pathlib import Path

    from .ml import fidelity

    a = get_ready_model(a_id, "compared")
    b = get_ready_model(b_id, "compared")
    shape = lambda m: (m.architecture, m.num_layers, m.hidden_size, m._config("vocab_size"))  # noqa: E731
    if shape(a) != shape(b):
        raise ServiceError("incomparable_models", f"{a.name} {a.quantization} ({', '.join(map(str, shape(a)))}) and "
                                                  f"{b.name} {b.quantization} ({', '.join(map(str, shape(b)))}) differ in "
                                                  "architecture, layers, hidden size or vocabulary; only models of one shape compare.")  # fmt: skip
    tokenizer = loading.tokenizer_for(a.weights_dir)
    device = quantize.compute_device()
    with tempfile.TemporaryDirectory(prefix="mistudio-compare-", dir=settings.DATA_DIR) as tmp:
        first = quantize.load_saved(a.weights_dir, device)
        info = fidelity.record(first, tokenizer, Path(tmp), max_tokens)
        del first
        quantize.free_accelerator_memory()
        second = quantize.load_saved(b.weights_dir, device)
        found = fidelity.compare(second, tokenizer, Path(tmp), max_tokens)
        del second
        quantize.free_accelerator_memory()
    return {"a": a.id, "b": b.id, "a_label": f"{a.name} {a.quantization}", "b_label": f"{b.name} {b.quantization}",
            "reference_perplexity": info["perplexity"], **found}  # fmt: skip


def fidelity_below(model: Model, captures: list[tuple[int, str]], threshold: float | None = None) -> list[dict]:
    """The chosen (layer, hook) captures whose mean cosine with FP32 is below the warning
    threshold (FIDELITY_COSINE_WARN), with the figures, in the model's fidelity table."""
    threshold = settings.FIDELITY_COSINE_WARN if threshold is None else threshold
    rows = {row["layer"]: row for row in (model.fidelity or {}).get("layers") or []}
    return [{"layer": layer, "hook": hook, **rows[layer][hook]} for layer, hook in captures
            if layer in rows and hook in rows[layer] and rows[layer][hook]["cosine"] < threshold]  # fmt: skip


def source_precision_model(model: Model) -> Model | None:
    """A ready FP32 record of the same snapshot as `model` (what its fidelity compares with)."""
    if model.quantization == "FP32":
        return None
    return model.snapshot_users().filter(quantization="FP32", status=ModelStatus.READY).order_by("created_at").first()
