"""Every state change of a Model that also enqueues, publishes or touches files.

Views, the API and the management commands all come through here.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
import uuid

import django_rq
from django.conf import settings
from django.db import transaction
from django.template.loader import render_to_string
from redis.exceptions import RedisError
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus

from mistudio import progress
from mistudio.crypto import encrypt_secret
from mistudio.errors import Conflict, NotFound, ServiceError, Unavailable

from .ml import architecture as architecture_view
from .ml import hub, loading, quantize
from .ml.errors import InvalidInput, JobError
from .ml.formats import validate_format
from .ml.validation import resolve_import_path, validate_repo_id, validate_revision
from .models import RUNNING_STATUSES, Model, ModelStatus

log = logging.getLogger(__name__)


def as_service_error(exc: InvalidInput) -> ServiceError:
    return ServiceError(exc.code, exc.message, details={"field": exc.field})


def queue():
    # Enqueue immediately: callers already wait for the row's transaction to commit.
    return django_rq.get_queue("default", commit_mode="auto")


def require_queue() -> None:
    """Refuse up front when Redis is down, so no row is left queued with no job."""
    try:
        queue().connection.ping()
    except RedisError:
        raise Unavailable(
            "queue_unavailable",
            "The job queue (Redis) is not reachable; nothing was started. Check REDIS_URL and that Redis runs.",
            retryable=True,
        ) from None


# --- publishing -------------------------------------------------------------------------


def render_card(model: Model, oob: bool = False) -> str:
    return render_to_string("models_app/_card.html", {"model": model, "oob": oob})


def render_model_list(oob: bool = False) -> str:
    return render_to_string("models_app/_model_list.html", {"models": list_for_panel(), "oob": oob})


def list_for_panel():
    return Model.objects.all()[:200]


def publish_card(model: Model, event: dict | None = None) -> None:
    progress.publish_html(render_card(model, oob=True))
    progress.publish_event(model.id, event or model.progress_event())


def publish_list() -> None:
    """The whole list, for changes that add or remove cards (every open tab converges)."""
    progress.publish_html(render_model_list(oob=True))


# --- starting jobs ----------------------------------------------------------------------


def job_timeout() -> int:
    """Seconds a job may run before RQ stops it (MISTUDIO_JOB_TIMEOUT)."""
    return int(settings.RQ_QUEUES["default"]["DEFAULT_TIMEOUT"])


def _enqueue_after_commit(model: Model, func: str) -> None:
    # The job id is on the row before the job exists: a cancel or a dead worker in between
    # still finds the job to stop or the row to fail.
    job_id = str(uuid.uuid4())
    Model.objects.filter(pk=model.pk).update(job_id=job_id)
    model.job_id = job_id

    def enqueue() -> None:
        try:
            queue().enqueue(func, model.id, job_id=job_id, job_timeout=job_timeout())
        except RedisError:
            Model.objects.filter(pk=model.pk, status=ModelStatus.QUEUED).update(
                status=ModelStatus.ERROR,
                error_code="queue_unavailable",
                error_message="The job queue (Redis) was not reachable; the job was not started.",
                encrypted_token=None,
            )
            publish_list()
            return
        publish_list()

    transaction.on_commit(enqueue)


def request_download(
    *, user, repo_id: str, quantization: str, token: str | None = None, revision: str | None = None, enqueue=True
) -> Model:
    """Validate, create the row and (unless the caller runs it inline) queue the download."""
    try:
        repo_id = validate_repo_id(repo_id)
        fmt = validate_format(quantization)
        revision = validate_revision(revision)
    except InvalidInput as exc:
        raise as_service_error(exc) from None
    token = (token or "").strip() or None
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
            created_by=user if user and user.is_authenticated else None,
        )
        if enqueue:
            _enqueue_after_commit(model, "models_app.jobs.download_model_job")
    return model


def request_import(*, user, path: str, name: str | None = None, enqueue=True) -> Model:
    try:
        resolved = resolve_import_path(path, settings.IMPORT_ROOTS)
    except InvalidInput as exc:
        raise as_service_error(exc) from None
    if enqueue:
        require_queue()
    source = "gguf" if resolved.is_file() else "local"
    default_name = resolved.stem if source == "gguf" else resolved.name
    with transaction.atomic():
        model = Model.objects.create(
            name=(name or "").strip()[:200] or default_name,
            source=source,
            source_path=str(resolved),
            created_by=user if user and user.is_authenticated else None,
        )
        if enqueue:
            _enqueue_after_commit(model, "models_app.jobs.import_model_job")
    return model


def request_quantize(*, user, model_id: str, quantization: str, enqueue=True) -> Model:
    """A new record for `quantization`, made from the stored snapshot of a ready model."""
    source = get_model(model_id)
    try:
        fmt = validate_format(quantization)
    except InvalidInput as exc:
        raise as_service_error(exc) from None
    if source.status != ModelStatus.READY:
        raise Conflict("model_not_ready", f"{source.name} is {source.status}; only a ready model can be quantized.")
    if fmt == source.quantization:
        raise ServiceError(
            "same_format", f"{source.name} already is {fmt}; pick another format.", details={"field": "quantization"}
        )
    if not source.raw_dir.is_dir():
        raise Conflict("snapshot_missing", f"The stored snapshot of {source.name} is gone; download it again.")
    check_fits(source.architecture_config, fmt)
    if enqueue:
        require_queue()
    with transaction.atomic():
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
            created_by=user if user and user.is_authenticated else None,
        )
        if enqueue:
            _enqueue_after_commit(model, "models_app.jobs.quantize_model_job")
    return model


def architecture(model_id: str) -> dict:
    model = get_model(model_id)
    if not model.architecture_config:
        raise Conflict("model_not_ready", f"{model.name} has no config yet ({model.status}).")
    try:
        return architecture_view.describe(model.architecture_config)
    except JobError as exc:
        raise ServiceError(exc.code, exc.message) from None


_ESTIMATE_CACHE: dict[tuple, tuple[float, dict]] = {}
ESTIMATE_TTL_SECONDS = 600


def estimate_repo(*, repo_id: str, revision: str | None = None, token: str | None = None) -> dict:
    """Parameters, memory and disk per format for a Hub repo, from its config and file
    sizes only (no weights fetched). Cached for ten minutes per repo and revision."""
    try:
        repo_id = validate_repo_id(repo_id)
        revision = validate_revision(revision)
    except InvalidInput as exc:
        raise as_service_error(exc) from None
    token = (token or "").strip() or None
    # Per token (hashed, never kept in clear): a gated repo's config read with one user's
    # token must not answer another user who has no access.
    key = (settings.HF_ENDPOINT, repo_id, revision, hashlib.sha256(token.encode()).hexdigest() if token else None)
    cached = _ESTIMATE_CACHE.get(key)
    if cached and time.monotonic() - cached[0] < ESTIMATE_TTL_SECONDS:
        return cached[1]
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
    _ESTIMATE_CACHE[key] = (time.monotonic(), result)
    return result


def check_fits(config: dict, fmt: str) -> None:
    """Refuse up front when even the smallest format cannot fit the memory budget."""
    device = quantize.compute_device()
    budget = quantize.memory_budget(settings.GPU_MEMORY_LIMIT, device)
    try:
        quantize.choose_format(fmt, quantize.memory_estimate(config, device), budget, device)
    except JobError as exc:
        raise ServiceError(exc.code, exc.message, details={"budget_bytes": budget}) from None


# --- cancel and delete ------------------------------------------------------------------


def get_model(model_id: str) -> Model:
    model = Model.objects.filter(pk=model_id).first()
    if model is None:
        raise NotFound("model_not_found", f"No model with id {model_id!r}.")
    return model


def remove_files(model: Model) -> None:
    for folder in model.owned_dirs():
        shutil.rmtree(folder, ignore_errors=True)


def stop_rq_job(job_id: str, wait_seconds: float = 15.0) -> None:
    """Stop the job's worker process (not just the row) and wait until it is gone, so no
    file is written after we clean up."""
    try:
        _stop(job_id, wait_seconds)
    except RedisError:
        log.warning("could not reach Redis to stop job %s", job_id)


def _stop(job_id: str, wait_seconds: float) -> None:
    connection = queue().connection
    try:
        job = Job.fetch(job_id, connection=connection)
    except NoSuchJobError:
        return
    status = job.get_status(refresh=True)
    if status in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
        job.cancel()
        return
    if status != JobStatus.STARTED:
        return
    try:
        send_stop_job_command(connection, job_id)
    except InvalidJobOperation:
        return
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        if job.get_status(refresh=True) != JobStatus.STARTED:
            return
        time.sleep(0.1)
    log.warning("job %s did not stop within %.0f s", job_id, wait_seconds)


def cancel_model(model_id: str) -> Model:
    model = get_model(model_id)
    if not model.is_running:
        raise Conflict("not_running", f"{model.name} is {model.status}; only a running job can be cancelled.")
    # The status flip is what an inline (--sync) job sees; the stop command ends a worker's.
    updated = Model.objects.filter(pk=model.pk, status__in=RUNNING_STATUSES).update(
        status=ModelStatus.CANCELLED, encrypted_token=None, speed_bps=0, eta_seconds=None
    )
    if not updated:  # the job finished (or failed) since the row was read: its files are the result
        model.refresh_from_db()
        raise Conflict("not_running", f"{model.name} is {model.status}; only a running job can be cancelled.")
    if model.job_id:
        stop_rq_job(model.job_id)
    remove_files(model)
    model.refresh_from_db()
    publish_card(model)
    return model


def delete_model(model_id: str) -> bool:
    """Remove the record and every file of it. A missing id is not an error: returns False."""
    model = Model.objects.filter(pk=model_id).first()
    if model is None:
        return False
    if model.is_running:
        raise Conflict(
            "model_in_use", f"{model.name} is {model.status}; cancel the job before deleting the model."
        )
    from activations_app.models import EXTRACTION_RUNNING

    if model.extractions.filter(status__in=EXTRACTION_RUNNING).exists():
        raise Conflict("model_in_use", f"An extraction of {model.name} is running; cancel it before deleting the model.")
    remove_files(model)
    model.delete()
    publish_list()
    return True
