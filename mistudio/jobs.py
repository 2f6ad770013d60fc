"""The tracked-job lifecycle, written once for every long job: model download, import and
quantization, extraction, dataset import.

A job's row is the source of truth. Every write while the job runs is conditional on
the row still running, so a cancel (a status flip by another process) is seen by the job
at its next write, as JobCancelled. However the job ends, the row ends in a final state:
ready or completed by the job's own last write; cancelled with its files removed; failed
with a code and a message a user can act on, its files removed (a download a retry can
resume keeps its partial bytes aside). Apps plug their row
classes in with `register` (from their AppConfig.ready); the worker's death handler
fails the rows of every registered kind the same way.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from django.conf import settings
from django.db import models, transaction
from django.template.loader import render_to_string
from django.utils import timezone
from redis.exceptions import RedisError
from rq.timeouts import JobTimeoutException

from . import progress, queue
from .crypto import encrypt_secret
from .errors import Conflict, Forbidden, InvalidInput, JobCancelled, JobError, NotFound, ServiceError, resumable
from .progress import MODELS_GROUP, LatestStateWriter
from .staging import staged_path
from .throttle import ProgressThrottle, TransferRate
from .validation import validate_token

log = logging.getLogger(__name__)

Listener = Callable[[object], None]
MAX_WRITES_PER_SECOND = 10


class TrackedRow(models.Model):
    """A row a job drives. The concrete model adds its `status` field and sets the class
    attributes below."""

    # Who made it: everyone signed in may read it and use it (when ready) to make their own;
    # only they or staff may cancel, retry or delete it (see may_change). None: nobody's,
    # so everyone's (made at the shell without --user, or before records had owners).
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="+")  # fmt: skip
    progress = models.FloatField(default=0.0)
    eta_seconds = models.FloatField(null=True, blank=True)
    error_code = models.CharField(max_length=40, blank=True)
    error_message = models.TextField(blank=True)
    # What the card says about how this run came about, besides its status: resumed by
    # itself after its worker stopped, or started over because its checkpoint was not trusted.
    notice = models.CharField(max_length=300, blank=True)
    # Which run of the row this is: 1, then one more each time it resumes by itself after its
    # worker stopped or its time ran out (at most settings.JOB_ATTEMPTS); a retry starts at 1.
    attempt = models.PositiveSmallIntegerField(default=1)
    job_id = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        abstract = True

    KIND: str  # "model", "extraction", "dataset": error codes and messages
    QUEUED: str
    RUNNING: tuple[str, ...]
    DONE: str  # the job's own successful end (its files are the result)
    FAILED: str
    CANCELLED: str
    IDLE_FIELDS: dict = {"eta_seconds": None}  # reset on a phase change and whenever the job stops
    TIMEOUT_HINT = "retry, or raise the limit"
    card_template: str  # the card partial; rendered with the row under its KIND name
    html_group = MODELS_GROUP  # pages that show the card

    @property
    def is_running(self) -> bool:
        return self.status in self.RUNNING

    @property
    def is_ready(self) -> bool:
        """The job ended well: its files are the result."""
        return self.status == self.DONE

    @property
    def label(self) -> str:
        """How messages name the row: its name, else its id."""
        return getattr(self, "name", "") or str(self.pk)

    @classmethod
    def rows(cls):
        return cls.objects.all()

    @classmethod
    def get_or_404(cls, pk: str):
        row = cls.rows().filter(pk=pk).first()
        if row is None:
            raise NotFound(f"{cls.KIND}_not_found", f"No {cls.KIND} with id {pk!r}.")
        return row

    def may_change(self, user) -> bool:
        """Cancel, delete, retry: the owner or staff. `user` None is the operator at the
        shell (a command run without --user). A row with no owner (made at the shell
        without --user, or before records had owners) is everyone's."""
        return user is None or user.is_staff or self.owner_id is None or self.owner_id == user.pk

    def check_may_change(self, user, action: str) -> None:
        if not self.may_change(user):
            raise Forbidden("not_owner", f"Only {self.owner.get_username()}, who made {self.label}, or staff may {action} it.")

    @classmethod
    def get_ready_or_409(cls, pk: str, purpose: str):
        """A row another job can use now, or a 409 that says why not."""
        row = cls.get_or_404(pk)
        if not row.is_ready:
            raise Conflict(f"{cls.KIND}_not_ready", f"{row.label} is {row.status}; {purpose} needs a ready {cls.KIND}.")
        return row

    def stop_fields(self, error: JobError | None) -> dict:
        """Fields written when the job stops without finishing (failed, or cancelled)."""
        return {}

    def retry_fields(self, token: str | None) -> dict:
        """Fields a retry writes besides the reset status, progress and error."""
        return {}

    def missing_inputs(self) -> list[str]:
        """What the job reads that is gone now (another row deleted since): a retry or resume
        is refused naming it, and nothing of this row's is touched."""
        return []

    def before_retry(self, resume: bool) -> None:
        """Called once a retry (or, `resume`, a resume) is allowed, before the row is queued:
        a kind that starts over on a retry drops what a resume would go on from, and one that
        can resume refuses when it kept nothing to go on from. A download keeps its partial
        bytes either way (its retry resumes them)."""
        if resume:
            raise Conflict("not_resumable", f"{self.label} cannot be resumed; retry it.")

    @property
    def job_function(self) -> str:
        """The dotted path of the RQ job that runs this row."""
        raise NotImplementedError

    def job_queue(self) -> str:
        """The queue its job goes to when nothing placed it (a retry): the shared one, unless
        the kind needs a worker with the memory for it."""
        return "default"

    def job_paths(self) -> list[Path]:
        """Every folder the row's job writes, staged ones included."""
        raise NotImplementedError

    resume_path: Path | None = None  # a staged download a retry resumes from

    def remove_job_files(self, keep_resumable: bool = False) -> None:
        """Everything the job wrote (a cancel, a delete); with `keep_resumable`, all but what
        a retry or resume goes on from (`resume_path`), never where finished files go."""
        kept = self.resume_path if keep_resumable else None
        for path in self.job_paths():
            if path != kept:
                shutil.rmtree(path, ignore_errors=True)

    def remove_failed_files(self, error: JobError) -> None:
        """What a failed job leaves: nothing, except that a job stopped by something a retry
        can get past (`resumable`) keeps its partial work aside for the retry."""
        self.remove_job_files(keep_resumable=resumable(error))

    def progress_event(self) -> dict:
        raise NotImplementedError

    def event_group(self) -> str | None:
        """The group of the JSON event clients of this row's progress."""
        return None

    def card_html(self, oob: bool = False, **context) -> str:
        return render_to_string(self.card_template, {self.KIND: self, "oob": oob, **context})

    def live_html(self) -> str:
        """What pages showing the row swap in (out-of-band by id) when it changes."""
        return self.card_html(oob=True)

    def publish(self) -> None:
        """The card to every page that shows it (out-of-band by id), the event to its clients."""
        progress.publish_html(self.live_html(), self.html_group)
        group = self.event_group()
        if group:
            progress.publish_event_to(group, self.progress_event())

    def publish_added(self) -> None:
        """A new row is queued: pages that list rows of this kind show it."""

    def publish_removed(self) -> None:
        """The row was deleted: pages that list rows of this kind drop it."""

    def delete_blocker(self) -> str | None:
        """Why the row cannot be deleted now besides its own job running (a job that uses it)."""
        return None


class TransferRow(TrackedRow):
    """A row whose job moves bytes from the Hub, with the user's token while it needs it."""

    bytes_done = models.BigIntegerField(default=0)
    bytes_total = models.BigIntegerField(default=0)
    speed_bps = models.FloatField(default=0.0)
    # The user's Hub token, Fernet-encrypted, kept only while the job needs it.
    encrypted_token = models.BinaryField(null=True, blank=True, editable=False)

    IDLE_FIELDS = {"speed_bps": 0, "eta_seconds": None}

    class Meta:
        abstract = True

    download_target: Path  # where the finished download goes

    @property
    def resume_path(self) -> Path:
        return staged_path(self.download_target)

    @property
    def speed_mbps(self) -> float:
        return round(self.speed_bps / 1e6, 2)

    def stop_fields(self, error: JobError | None) -> dict:
        return {"encrypted_token": None}

    def retry_fields(self, token: str | None) -> dict:
        return {"encrypted_token": encrypt_secret(token) if token else None, "bytes_done": 0}


def owner_of(user):
    """The owner a new row gets: the signed-in user, or None for the operator at the shell."""
    return user if user is not None and user.is_authenticated else None


_KINDS: list[type[TrackedRow]] = []


def register(row_class: type[TrackedRow]) -> None:
    if row_class not in _KINDS:
        _KINDS.append(row_class)


def fail(row_class: type[TrackedRow], pk: str, error: JobError, publish: bool = True):
    """The row ends failed with the error's code and message, and its files go."""
    row = row_class.rows().filter(pk=pk).first()
    if row is None:
        return None
    row_class.objects.filter(pk=pk, status__in=row_class.RUNNING).update(
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
            **row_class.IDLE_FIELDS, **row.retry_fields(token),
        )  # fmt: skip
        if not updated:
            raise refuse()
        row = row_class.rows().get(pk=pk)
        if enqueue:  # else the caller runs it inline (a command's --sync)
            enqueue_after_commit(row, row.job_function, new=False)
    row.publish()
    return row


def resume(row_class: type[TrackedRow], pk: str, user, enqueue: bool = True):
    """A stopped run goes on from what it kept (see retry)."""
    return retry(row_class, pk, user, enqueue=enqueue, resume=True)


def enqueue_after_commit(row: TrackedRow, func: str, queue_name: str | None = None, new: bool = True) -> None:
    """Queue `func(row.pk)` once the row's transaction commits. The job id is on the row
    before the job exists: a cancel or a dead worker in between still finds the job to stop
    or the row to fail. Redis refusing the job fails the row, with that reason. The queue is
    the device class the caller placed it on, else the row's own choice (`job_queue`). A
    `new` row's card is added to every open list; a retried one is already there and is
    updated in place (by its publish), never added a second time."""
    job_id = str(uuid.uuid4())
    queue_name = queue_name or row.job_queue()
    type(row).objects.filter(pk=row.pk).update(job_id=job_id)
    row.job_id = job_id

    def enqueue() -> None:
        try:
            queue.enqueue(func, row.pk, job_id, queue_name)
        except RedisError:
            error = JobError("queue_unavailable", "The job queue (Redis) was not reachable; the job was not started.")
            failed = fail(type(row), row.pk, error, publish=not new)
            if failed is not None and new:
                failed.publish_added()
            return
        if new:
            row.publish_added()

    transaction.on_commit(enqueue)


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
        self.listener = listener
        self.throttle = ProgressThrottle()
        self.rate = TransferRate()
        self._lock = threading.Lock()
        self._writer = LatestStateWriter(
            lambda state: self.write(**state), name=f"progress-{row.pk}", max_per_second=MAX_WRITES_PER_SECOND
        )

    def write(self, **fields):
        """Written at once, if the row still runs; else JobCancelled."""
        with self._lock:
            updated = self.row_class.objects.filter(pk=self.pk, status__in=self.row_class.RUNNING).update(
                updated_at=timezone.now(), **fields
            )
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
        return self.write(status=status, **{**self.row_class.IDLE_FIELDS, **fields})

    def check(self) -> None:
        """Raise what the writer found (a cancelled row) in the job's own thread."""
        self._writer.check()

    def report(self, percent: float, fields: Callable[[], dict], force: bool = False) -> None:
        """Throttled progress; `fields()` is only built when the update goes through."""
        self.check()
        if self.throttle.should_emit(percent, force=force):
            self._writer.submit({"progress": percent, **fields()})

    def transfer(self, done: int, total: int) -> None:
        """Byte progress of a download or copy; cheap, callable from any thread."""
        self.check()
        self.rate.add(done)
        percent = 100.0 * done / total if total else 100.0
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


def _read_queued_row(row_class: type[TrackedRow], pk: str):
    """The job's row, waiting with backoff while the database refuses connections (its
    connection limit reached, a restart): a job forked in that minute used to fail before
    any error handling, leaving its row queued with no job. One that still cannot connect
    raises; the row stays queued and the workers' maintenance queues it again (reap_stranded)."""
    from django.db import InterfaceError, OperationalError, connections

    for wait in DATABASE_WAITS:
        try:
            return row_class.rows().filter(pk=pk).first()
        except (OperationalError, InterfaceError) as exc:
            log.warning("%s %s: the database refused the job (%s); trying again in %d s", row_class.KIND, pk,
                        type(exc).__name__, wait)  # fmt: skip
            connections.close_all()
            time.sleep(wait)
    return row_class.rows().filter(pk=pk).first()


def run_tracked(row_class: type[TrackedRow], pk: str, work: Callable[[TrackedRow, TrackedJob], None],
                listener: Listener | None = None):  # fmt: skip
    """Run `work(row, job)` for a queued row, and record how it ended: cancelled → files
    removed; failed (down to a Ctrl-C in a --sync command or a job timeout) → the row in
    error with its reason, files removed, the exception re-raised so RQ records it too."""
    row = _read_queued_row(row_class, pk)
    if row is None or row.status != row_class.QUEUED:
        log.info("%s %s is gone or no longer queued; nothing to do", row_class.KIND, pk)
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
        stopped.remove_job_files(keep_resumable=stopped.error_code == STOPPED_KEPT)
        log.info("%s %s cancelled; files removed", row_class.KIND, pk)
    except BaseException as exc:
        if not isinstance(exc, (JobError, JobTimeoutException, KeyboardInterrupt, SystemExit)):
            log.exception("%s %s failed unexpectedly", row_class.KIND, pk)
        if not (isinstance(exc, JobTimeoutException) and resume_by_itself(row_class, pk, "its time ran out")):
            fail(row_class, pk, error_for(exc, row_class))
        raise
    row = row_class.rows().get(pk=pk)
    if listener:
        listener(row)
    return row


def mark_worker_died(job_id: str, reason: str) -> None:
    """The worker process running a job died (killed, out of memory, a reboot): whatever
    kind of row it was running must not stay running. It resumes by itself while it has
    attempts left (resume_by_itself); else it fails, keeping what a retry goes on from."""
    error = JobError("worker_died", f"The worker process stopped unexpectedly ({reason}); retry.")
    for row_class in _KINDS:
        for pk in row_class.objects.filter(job_id=job_id, status__in=row_class.RUNNING).values_list("pk", flat=True):
            if not resume_by_itself(row_class, pk, "its worker stopped"):
                fail(row_class, pk, error)


def resume_by_itself(row_class: type[TrackedRow], pk: str, why: str) -> bool:
    """A run stopped by something that was not its own fault (its worker died, its time ran
    out, its job was lost before it started) is queued again by itself, going on from what
    it kept (a download's partial bytes, an extraction's checkpoint, checked before it is
    trusted), while it has attempts left (settings.JOB_ATTEMPTS, counting the first run) and
    its inputs still exist. Its card says so. False: the caller fails it as before."""
    row = row_class.rows().filter(pk=pk).first()
    if row is None or row.attempt >= settings.JOB_ATTEMPTS or row.missing_inputs():
        return False
    attempt = row.attempt + 1
    notice = f"Resumed automatically after {why} (attempt {attempt} of {settings.JOB_ATTEMPTS})."
    with transaction.atomic():
        updated = row_class.objects.filter(pk=pk, status__in=row_class.RUNNING).update(
            status=row_class.QUEUED, progress=0.0, attempt=attempt, notice=notice, updated_at=timezone.now(),
            **row_class.IDLE_FIELDS,
        )  # fmt: skip
        if not updated:  # it ended (or was cancelled) meanwhile
            return False
        row = row_class.rows().get(pk=pk)
        row.remove_job_files(keep_resumable=True)
        enqueue_after_commit(row, row.job_function, new=False)
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


def reap_stranded() -> int:
    """Queued rows with no job waiting or running for them (a job that could not reach the
    database ended before it read its row; a Redis that lost its data): queued again by
    themselves while they have attempts left, else failed with a reason. How many."""
    cutoff = timezone.now() - timezone.timedelta(seconds=STRANDED_AFTER_SECONDS)
    error = JobError("job_lost", "Its job was lost before it started (the worker could not reach the database, "
                                 "or the queue lost it); retry.")  # fmt: skip
    reaped = 0
    for row_class in _KINDS:
        for pk, job_id in row_class.objects.filter(status=row_class.QUEUED, updated_at__lt=cutoff).values_list("pk", "job_id"):
            if job_id and queue.job_is_pending(job_id):
                continue
            if not resume_by_itself(row_class, pk, "its job was lost before it started"):
                fail(row_class, pk, error)
            reaped += 1
    return reaped
