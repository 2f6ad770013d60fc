"""The lifecycle actions, written once for every kind of row: register a kind, fail, cancel,
delete, retry and resume, and queue a row's job once its transaction commits. The page, the
API, the commands and the admin all call these."""

from __future__ import annotations

import uuid

from django.db import transaction
from django.utils import timezone
from redis.exceptions import RedisError

from .. import capacity, queue
from ..errors import Conflict, InvalidInput, JobError, ServiceError
from ..validation import validate_token
from .rows import TrackedRow


_KINDS: list[type[TrackedRow]] = []


# What a kind of row must supply (the rest has defaults on TrackedRow): checked when it is
# registered, from its app's ready(), so a kind that forgets one fails at start-up.
REQUIRED_ATTRIBUTES = ("KIND", "QUEUED", "RUNNING", "DONE", "FAILED", "CANCELLED", "card_template", "status")
REQUIRED_OVERRIDES = ("job_function", "job_paths", "progress_event")


def register(row_class: type[TrackedRow]) -> None:
    """A kind of tracked row: its worker's death, its lost jobs and its retries are handled
    like every other's. Refused at start-up when it lacks a piece the lifecycle needs."""
    from django.core.exceptions import ImproperlyConfigured

    missing = [name for name in REQUIRED_ATTRIBUTES if not hasattr(row_class, name)]
    missing += [name for name in REQUIRED_OVERRIDES if getattr(row_class, name) is getattr(TrackedRow, name)]
    if missing:
        raise ImproperlyConfigured(f"{row_class.__name__} is registered as a kind of job but does not define "
                                   f"{', '.join(missing)} (see mistudio.jobs.TrackedRow).")  # fmt: skip
    if row_class not in _KINDS:
        _KINDS.append(row_class)


def fail(row_class: type[TrackedRow], pk: str, error: JobError, publish: bool = True, job_id: str | None = None):
    """The row ends failed with the error's code and message, and its files go. With
    `job_id`, only while the row is still that job's (not queued again under another)."""
    row = row_class.rows().filter(pk=pk).first()
    if row is None or (job_id is not None and row.job_id != job_id):
        return None
    row_class.objects.filter(pk=pk, status__in=row_class.RUNNING, **({"job_id": job_id} if job_id is not None else {})).update(
        status=row_class.FAILED, error_code=error.code, error_message=error.message, updated_at=timezone.now(),
        **row_class.IDLE_FIELDS, **row.stop_fields(error),
    )  # fmt: skip
    row.refresh_from_db()
    if row.status == row_class.FAILED:
        row.remove_failed_files(error)
    elif row.status != row_class.DONE:
        row.remove_job_files()
    if publish:
        row.publish()
    return row


STOPPED_KEPT = "stopped_kept"


def cancel(row_class: type[TrackedRow], pk: str, user, keep: bool = False):
    """Flip the row to cancelled (what an inline job sees), stop its worker process, remove
    its files (with `keep`, all but what a resume goes on from), and tell every page and
    client. Only its owner or staff may."""
    row = row_class.get_or_404(pk)
    row.check_may_change(user, "cancel")

    def refuse() -> Conflict:
        return Conflict("not_running", f"{row.label} is {row.status}; only a running job can be cancelled.")

    if not row.is_running:
        raise refuse()
    # With `keep`, the row says so (error_code "stopped_kept"): the job, if it sees the cancel
    # before its process is stopped, then leaves what a resume goes on from.
    updated = row_class.objects.filter(pk=pk, status__in=row_class.RUNNING).update(
        status=row_class.CANCELLED, updated_at=timezone.now(), **row_class.IDLE_FIELDS, **row.stop_fields(None),
        **({"error_code": STOPPED_KEPT} if keep else {}),
    )  # fmt: skip
    if not updated:  # the job finished (or failed) since the row was read: its files are the result
        row.refresh_from_db()
        raise refuse()
    if row.job_id:
        queue.stop_rq_job(row.job_id)
    row.remove_job_files(keep_resumable=keep)
    row = row_class.rows().get(pk=pk)
    row.publish()
    return row


def delete(row_class: type[TrackedRow], pk: str, user) -> bool:
    """The row and every file of it, by its owner or staff; 409 while its own job or a job
    that uses it runs (cancel first). A missing id is not an error: False."""
    row = row_class.rows().filter(pk=pk).first()
    if row is None:
        return False
    row.check_may_change(user, "delete")
    blocker = f"{row.label} is {row.status}; cancel it before deleting it." if row.is_running else row.delete_blocker()
    if blocker:
        raise Conflict(f"{row_class.KIND}_in_use", blocker)
    row.remove_job_files()
    row.delete()
    row.pk = pk  # delete() clears the key; the pages drop the card by it
    row.publish_removed()
    return True


def retry(row_class: type[TrackedRow], pk: str, user, token: str | None = None, enqueue: bool = True, resume: bool = False):
    """A failed or cancelled job queued again on the same row (owner or staff only): the one
    retry (and, `resume`, the one resume) the page, the API, the commands and the admin all
    use. A download picks up the bytes its earlier attempt left on disk; an extraction starts
    over on a retry and goes on from its checkpoint on a resume (the row's before_retry)."""
    row = row_class.get_or_404(pk)
    row.check_may_change(user, "retry")
    try:
        token = validate_token(token)
    except InvalidInput as exc:
        raise ServiceError.from_invalid(exc) from None

    def refuse() -> Conflict:
        return Conflict("not_retryable", f"{row.label} is {row.status}; only a failed or cancelled job can be retried.")

    if row.status not in (row_class.FAILED, row_class.CANCELLED):
        raise refuse()
    missing = row.missing_inputs()
    if missing:
        raise Conflict("inputs_missing", f"{row.label} cannot run again: {' and '.join(missing)} "
                                         f"{'was' if len(missing) == 1 else 'were'} deleted. Nothing of it was changed.",
                       details={"missing": missing})  # fmt: skip
    if enqueue:
        queue.require_queue()
    row.before_retry(resume)
    with transaction.atomic():
        updated = row_class.objects.filter(pk=pk, status__in=(row_class.FAILED, row_class.CANCELLED)).update(
            status=row_class.QUEUED, progress=0.0, error_code="", error_message="", notice="", attempt=1, updated_at=timezone.now(),
            **({} if enqueue else {"job_id": ""}),  # run here: no job of the queue's is this run
            **row_class.IDLE_FIELDS, **row.retry_fields(token),
        )  # fmt: skip
        if not updated:
            raise refuse()
        row = row_class.rows().get(pk=pk)
        if enqueue:  # else the caller runs it inline (a command's --sync)
            enqueue_after_commit(row, new=False)
    row.publish()
    return row


def resume(row_class: type[TrackedRow], pk: str, user, enqueue: bool = True):
    """A stopped run goes on from what it kept (see retry)."""
    return retry(row_class, pk, user, enqueue=enqueue, resume=True)


def queue_for(row: TrackedRow, refuse: bool = True) -> str:
    """The one placement rule: the device-class queue of a live worker that can hold the
    row's job (its placement_judge), the shared queue when any will do. `refuse`: a job no
    live worker can hold is refused now (ServiceError does_not_fit, naming every worker's
    budget); else (a retry, an automatic resume) it goes to the shared queue and the job
    itself records why it cannot run."""
    judge = row.placement_judge()
    if judge is None:
        return capacity.SHARED_QUEUE
    return capacity.place(judge).queue if refuse else capacity.queue_or_shared(judge)


def enqueue_after_commit(row: TrackedRow, queue_name: str | None = None, new: bool = True) -> None:
    """Queue the row's job (its class's `job_function`, the one place its path is written)
    once the row's transaction commits. The job id is on the row
    before the job exists: a cancel or a dead worker in between still finds the job to stop
    or the row to fail. Redis refusing the job fails the row, with that reason. The queue is
    the device class the caller placed it on, else the row's own choice (`job_queue`). A
    `new` row's card is added to every open list; a retried one is already there and is
    updated in place (by its publish), never added a second time."""
    job_id = str(uuid.uuid4())
    queue_name = queue_name or queue_for(row, refuse=False)
    type(row).objects.filter(pk=row.pk).update(job_id=job_id)
    row.job_id = job_id

    def enqueue() -> None:
        try:
            queue.enqueue(row.job_function, row.pk, job_id, queue_name)
        except RedisError:
            error = JobError("queue_unavailable", "The job queue (Redis) was not reachable; the job was not started.")
            failed = fail(type(row), row.pk, error, publish=not new)
            if failed is not None and new:
                failed.publish_added()
            return
        if new:
            row.publish_added()

    transaction.on_commit(enqueue)
