"""One run of a row's job: the progress writer its work reports to, and the runner that
records how the run ended (completed, cancelled, failed, or queued again by itself)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from django.utils import timezone
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from .. import queue
from ..errors import JobCancelled, JobError
from ..progress import LatestStateWriter
from ..throttle import ProgressThrottle, TransferRate
from .lifecycle import STOPPED_KEPT, fail
from .recovery import backoff_seconds, recover
from .rows import TrackedRow

log = logging.getLogger(__name__)

Listener = Callable[[object], None]
MAX_WRITES_PER_SECOND = 10


def error_for(exc: BaseException, row_class: type[TrackedRow]) -> JobError:
    """Any way a job can end early, as the code and message its row shows."""
    if isinstance(exc, JobError):
        return exc
    if isinstance(exc, JobTimeoutException):
        return JobError("timeout", f"The job passed the time limit of {queue.job_timeout() / 3600:.0f} h "
                                   f"(MISTUDIO_JOB_TIMEOUT) and was stopped; {row_class.TIMEOUT_HINT}.")  # fmt: skip
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return JobError("interrupted", "The job was interrupted before it finished; start it again.")
    return JobError("internal_error", f"Unexpected error: {type(exc).__name__}. See the worker log.")


class TrackedJob:
    """One run of a row's job: what its work calls to record progress.

    Progress arrives from the job's own loop (download threads, the forward pass) many
    times a second; a writer thread takes the latest state (throttled to 0.5 s or 1 %) and
    does the database write, rendering and channel-layer send, so the work never waits on
    them. A cancelled row is found by that write and raised here at the next call."""

    def __init__(self, row: TrackedRow, listener: Listener | None = None) -> None:
        self.row_class = type(row)
        self.pk = row.pk
        # This run's job id: a write finds the row still its own, or the run stops. A row
        # queued again meanwhile (resumed by itself after this run was taken for dead) has a
        # new job id, and this run must not write to it or touch its files.
        self.job_id = row.job_id
        self.listener = listener
        self.throttle = ProgressThrottle()
        self.rate = TransferRate()
        self._lock = threading.Lock()
        self._writer = LatestStateWriter(
            lambda state: self.write(**state), name=f"progress-{row.pk}", max_per_second=MAX_WRITES_PER_SECOND
        )

    def write(self, **fields):
        """Written at once, if the row still runs; else JobCancelled. A database that refuses
        a new connection (all of them held elsewhere; the progress thread opens its own) is
        waited for, as at the job's start (DATABASE_WAITS), instead of failing the run."""
        with self._lock:
            updated = _with_database(lambda: self.row_class.objects.filter(
                pk=self.pk, job_id=self.job_id, status__in=self.row_class.RUNNING).update(updated_at=timezone.now(), **fields),
                f"{self.row_class.KIND} {self.pk}")  # fmt: skip
            if not updated:
                raise JobCancelled()
            row = self.row_class.rows().get(pk=self.pk)
        row.publish()
        if self.listener:
            self.listener(row)
        return row

    def phase(self, status: str, **fields):
        """A status change: written at once, after any progress still pending."""
        self.flush()
        self.throttle.should_emit(0.0, force=True)
        self.rate = TransferRate()  # a new phase's speed is its own
        return self.write(status=status, **{**self.row_class.IDLE_FIELDS, **fields})

    def check(self) -> None:
        """Raise what the writer found (a cancelled row) in the job's own thread."""
        self._writer.check()

    def report(self, percent: float, fields: Callable[[], dict], force: bool = False) -> None:
        """Throttled progress; `fields()` is only built when the update goes through."""
        self.check()
        if self.throttle.should_emit(percent, force=force):
            self._writer.submit({"progress": percent, **fields()})

    def transfer(self, done: int, total: int, start: float = 0.0, end: float = 100.0) -> None:
        """Byte progress of a download, a copy or a streamed quantization, as the phase's
        `start`..`end` %; cheap, callable from any thread."""
        self.check()
        self.rate.add(done)
        percent = start + (end - start) * (done / total if total else 1.0)
        self.report(
            percent,
            lambda: {"bytes_done": done, "bytes_total": total, "speed_bps": self.rate.bytes_per_second(),
                     "eta_seconds": self.rate.eta_seconds(total)},
            force=done >= total,
        )  # fmt: skip

    def flush(self, raise_error: bool = True) -> None:
        """Write what is pending and stop the writer thread; raise if it found the row cancelled."""
        self._writer.flush(raise_error)


DATABASE_WAITS = (1, 2, 4, 8, 15, 15, 15)  # seconds: a job waits a minute for the database before it gives up


def _with_database(query, what: str):
    """`query()`, waiting with backoff while the database refuses connections (its
    connection limit reached, a restart); after DATABASE_WAITS it raises."""
    from django.db import InterfaceError, OperationalError, connection

    for wait in DATABASE_WAITS:
        try:
            return query()
        except (OperationalError, InterfaceError) as exc:
            log.warning("%s: the database refused the job (%s); trying again in %d s", what, type(exc).__name__, wait)
            connection.close()  # this thread's: the next query opens a new one
            time.sleep(wait)
    return query()


def _read_queued_row(row_class: type[TrackedRow], pk: str):
    """The job's row, waited for while the database refuses connections: a job forked in
    such a minute used to fail before any error handling, leaving its row queued with no
    job. One that still cannot connect raises; the row stays queued and the workers'
    maintenance queues it again (reap_stranded)."""
    return _with_database(lambda: row_class.rows().filter(pk=pk).first(), f"{row_class.KIND} {pk}")


def run_tracked(row_class: type[TrackedRow], pk: str, work: Callable[[TrackedRow, TrackedJob], None],
                listener: Listener | None = None):  # fmt: skip
    """Run `work(row, job)` for a queued row, and record how it ended: cancelled → files
    removed; failed (down to a Ctrl-C in a --sync command or a job timeout) → the row in
    error with its reason, files removed, the exception re-raised so RQ records it too."""
    row = _read_queued_row(row_class, pk)
    if row is None or row.status != row_class.QUEUED:
        log.info("%s %s is gone or no longer queued; nothing to do", row_class.KIND, pk)
        return None
    current = get_current_job()  # None in a command's inline run
    if current is not None and row.job_id != current.id:
        log.info("%s %s was queued again under another job (%s); this one (%s) leaves it", row_class.KIND, pk, row.job_id, current.id)
        return None
    if row.attempt > 1:
        time.sleep(backoff_seconds(row.attempt))
    job = TrackedJob(row, listener)
    try:
        try:
            work(row, job)
        finally:
            job.flush(raise_error=False)
        job.check()
    except JobCancelled:
        stopped = row_class.rows().get(pk=pk)
        if stopped.job_id != job.job_id:  # queued again under another job: its files are that run's now
            log.info("%s %s: this run (%s) was taken for dead and the row queued again; it stops", row_class.KIND, pk, job.job_id)
            return None
        stopped.remove_job_files(keep_resumable=stopped.error_code == STOPPED_KEPT)
        log.info("%s %s cancelled; files removed", row_class.KIND, pk)
    except BaseException as exc:
        if not isinstance(exc, (JobError, JobTimeoutException, KeyboardInterrupt, SystemExit)):
            log.exception("%s %s failed unexpectedly", row_class.KIND, pk)
        if isinstance(exc, JobTimeoutException):
            recover(row_class, pk, job.job_id, "its time ran out", error_for(exc, row_class))
        else:
            fail(row_class, pk, error_for(exc, row_class), job_id=job.job_id)
        raise
    row = row_class.rows().get(pk=pk)
    if listener:
        listener(row)
    return row
