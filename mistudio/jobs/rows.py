"""A tracked row: the fields every long job's record has (status, progress, error, notice,
attempt, job id, owner) and what the pages and events show of it. A kind of row (a model,
a dataset, an extraction, an export) sets the class attributes and overrides the hooks;
`register` (lifecycle.py) checks at start-up that it did."""

from __future__ import annotations

import shutil
from pathlib import Path

from django.conf import settings
from django.db import models
from django.template.loader import render_to_string

from .. import progress
from ..crypto import encrypt_secret
from ..errors import Conflict, Forbidden, JobError, NotFound, resumable
from ..progress import MODELS_GROUP
from ..staging import staged_path


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
    def waiting_note(self) -> str:
        """A queued row's place in line ("2nd in line for the cpu workers"): "" otherwise, or
        when Redis cannot say."""
        if self.status != self.QUEUED:
            return ""
        from ..queue import queue_position

        found = queue_position(self.job_id)
        if found is None:
            return ""
        place, name = found
        suffix = "th" if 10 <= place % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(place % 10, "th")
        workers = "any worker" if name == "default" else f"the {name} workers"
        return f"{place}{suffix} in line for {workers}"

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

    def placement_judge(self):
        """How a worker is judged for this row's job (mistudio.capacity: worker → Verdict),
        or None when any worker will do (the shared queue). See lifecycle.queue_for."""
        return None

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
