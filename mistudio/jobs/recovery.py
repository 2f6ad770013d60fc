"""What happens to a run that stopped through no fault of its own: its worker died, its time
ran out, or its job was lost before it started. It is queued again by itself while it has
attempts left, going on from what it kept; else it fails with a reason. The workers call
these (their death handler, their maintenance)."""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from .. import queue
from ..errors import JobError
from .lifecycle import _KINDS, enqueue_after_commit, fail
from .rows import TrackedRow

log = logging.getLogger(__name__)


def mark_worker_died(job_id: str, reason: str) -> None:
    """The worker process running a job died (killed, out of memory, a reboot): whatever
    kind of row it was running must not stay running. It resumes by itself while it has
    attempts left (resume_by_itself); else it fails, keeping what a retry goes on from."""
    error = JobError("worker_died", f"The worker process stopped unexpectedly ({reason}); retry.")
    for row_class in _KINDS:
        for pk in row_class.objects.filter(job_id=job_id, status__in=row_class.RUNNING).values_list("pk", flat=True):
            recover(row_class, pk, job_id, "its worker stopped", error)


def recover(row_class: type[TrackedRow], pk: str, job_id: str, why: str, error: JobError) -> None:
    """A run of job `job_id` stopped through no fault of its own: queued again by itself while
    it can be (resume_by_itself), else failed with `error`."""
    if not resume_by_itself(row_class, pk, why, job_id):
        fail(row_class, pk, error, job_id=job_id)


def resume_by_itself(row_class: type[TrackedRow], pk: str, why: str, job_id: str | None = None) -> bool:
    """A run stopped by something that was not its own fault (its worker died, its time ran
    out, its job was lost before it started) is queued again by itself, going on from what
    it kept (a download's partial bytes, an extraction's checkpoint, checked before it is
    trusted), while it has attempts left (settings.JOB_ATTEMPTS, counting the first run) and
    its inputs still exist. Its card says so. False: the caller fails it as before. With
    `job_id`, only while the row is still that job's. Of two callers at once (a death notice
    and the reaper), one wins: the update is conditional on the attempt and job it read."""
    row = row_class.rows().filter(pk=pk).first()
    if row is None or row.attempt >= settings.JOB_ATTEMPTS or row.missing_inputs():
        return False
    if job_id is not None and row.job_id != job_id:
        return False
    attempt = row.attempt + 1
    notice = f"Resumed automatically after {why} (attempt {attempt} of {settings.JOB_ATTEMPTS})."
    with transaction.atomic():
        updated = row_class.objects.filter(pk=pk, status__in=row_class.RUNNING, attempt=row.attempt, job_id=row.job_id).update(
            status=row_class.QUEUED, progress=0.0, attempt=attempt, notice=notice, updated_at=timezone.now(),
            **row_class.IDLE_FIELDS,
        )  # fmt: skip
        if not updated:  # it ended (or was cancelled) meanwhile
            return False
        row = row_class.rows().get(pk=pk)
        row.remove_job_files(keep_resumable=True)
        enqueue_after_commit(row, new=False)
    log.warning("%s %s: %s; resumed by itself (attempt %d of %d)", row_class.KIND, pk, why, attempt, settings.JOB_ATTEMPTS)
    row.publish()
    return True


def backoff_seconds(attempt: int) -> float:
    """How long a run that resumed by itself waits before it starts: JOB_RETRY_BACKOFF_SECONDS,
    doubled for every further attempt, at most a minute."""
    return 0.0 if attempt <= 1 else min(60.0, settings.JOB_RETRY_BACKOFF_SECONDS * 2 ** (attempt - 2))


# A queued row whose job is gone for this long is stranded: its job failed before it could
# reach the database, or Redis lost it. The workers' maintenance (every 30 s) finds it.
STRANDED_AFTER_SECONDS = 60
# A running row nothing has written to for this long, whose job RQ no longer holds.
STALE_RUNNING_AFTER_SECONDS = 10 * 60


def reap_stranded() -> int:
    """Queued rows with no job waiting or running for them (a job that could not reach the
    database ended before it read its row; a Redis that lost its data): queued again by
    themselves while they have attempts left, else failed with a reason. How many."""
    cutoff = timezone.now() - timezone.timedelta(seconds=STRANDED_AFTER_SECONDS)
    error = JobError("job_lost", "Its job was lost before it started (the worker could not reach the database, "
                                 "or the queue lost it); retry.")  # fmt: skip
    quiet = timezone.now() - timezone.timedelta(seconds=STALE_RUNNING_AFTER_SECONDS)
    ended = JobError("job_lost", "Its job ended without saying how (the queue lost it, or its last write did not "
                                 "reach the database); retry.")  # fmt: skip
    reaped = 0
    for row_class in _KINDS:
        for pk, job_id in row_class.objects.filter(status=row_class.QUEUED, updated_at__lt=cutoff).values_list("pk", "job_id"):
            if not job_id or queue.job_is_pending(job_id):
                continue  # no job id: a command runs it here (never handed to a worker)
            recover(row_class, pk, job_id, "its job was lost before it started", error)
            reaped += 1
        # Running, by a worker's job that RQ no longer holds as waiting or running, and quiet for
        # long: nobody is left to finish it (a dead worker RQ lost track of, a final write that
        # could not reach the database). A live job is started in RQ, so it is never taken.
        running = [status for status in row_class.RUNNING if status != row_class.QUEUED]
        for pk, job_id in row_class.objects.filter(status__in=running, updated_at__lt=quiet).exclude(job_id="").values_list("pk", "job_id"):
            if queue.job_is_pending(job_id):
                continue
            recover(row_class, pk, job_id, "its job ended without saying how", ended)
            reaped += 1
    return reaped
