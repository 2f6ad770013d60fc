"""The job queue (RQ on Redis): enqueue, refuse up front when Redis is down, stop a job."""

from __future__ import annotations

import logging
import time

import django_rq
from django.conf import settings
from redis.exceptions import RedisError
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.queue import Queue

from .errors import Unavailable

log = logging.getLogger(__name__)


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


def job_timeout() -> int:
    """Seconds a job may run before RQ stops it (MISTUDIO_JOB_TIMEOUT)."""
    return int(settings.RQ_QUEUES["default"]["DEFAULT_TIMEOUT"])


def enqueue(func: str, row_id: str, job_id: str, queue_name: str = "default") -> None:
    """Onto the shared queue, or onto a device class's queue (see mistudio.capacity)."""
    target = queue() if queue_name == "default" else Queue(queue_name, connection=queue().connection)
    target.enqueue(func, row_id, job_id=job_id, job_timeout=job_timeout())


def job_is_pending(job_id: str) -> bool:
    """Whether RQ still holds the job as waiting or running (queued, deferred, scheduled or
    started). A Redis that cannot be reached counts as pending: nothing is reaped blind."""
    try:
        job = Job.fetch(job_id, connection=queue().connection)
        return job.get_status(refresh=False) in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED, JobStatus.STARTED)
    except NoSuchJobError:
        return False
    except RedisError:
        return True


def side_job_stopped(job_id: str | None, asked_at: str | None) -> bool:
    """Whether a job that keeps no tracked row (a file check, a dataset's statistics) ended
    without recording its outcome: RQ no longer holds it, or it has run past the job time
    limit (a killed worker's job stays "started" in RQ until its registry is cleaned). The
    page then says so instead of "checking…" for ever."""
    from datetime import datetime, timezone

    if not job_id:
        return False
    try:
        started = datetime.fromisoformat(asked_at) if asked_at else None
    except ValueError:
        started = None
    late = started is not None and (datetime.now(timezone.utc) - started).total_seconds() > job_timeout()
    return late or not job_is_pending(job_id)


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


def queue_position(job_id: str) -> tuple[int, str] | None:
    """Where a queued job waits: (its place in line from 1, the queue's name), or None when
    it is not waiting in a queue (started, gone) or Redis cannot say (never an error: a card
    shows this)."""
    if not job_id:
        return None
    try:
        job = Job.fetch(job_id, connection=queue().connection)
        if job.get_status(refresh=False) != JobStatus.QUEUED:
            return None
        position = job.get_position()
    except (NoSuchJobError, RedisError):
        return None
    return (position + 1, job.origin) if position is not None else None
