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

The floor, by concern: `rows` (the fields every tracked row has and how it is shown),
`lifecycle` (register, fail, cancel, delete, retry, resume, where a job goes, enqueue), `recovery` (a dead
worker, a lost job: queued again or failed) and `runner` (one run: progress, and how it
ended). Everything is importable from here.
"""

from .lifecycle import (  # noqa: F401
    _KINDS, REQUIRED_ATTRIBUTES, REQUIRED_OVERRIDES, STOPPED_KEPT, cancel, delete, enqueue_after_commit, fail, queue_for,
    register, resume, retry,
)
from .recovery import STRANDED_AFTER_SECONDS, backoff_seconds, mark_worker_died, reap_stranded, recover, resume_by_itself  # noqa: F401
from .rows import TrackedRow, TransferRow, owner_of  # noqa: F401
from .runner import DATABASE_WAITS, MAX_WRITES_PER_SECOND, Listener, TrackedJob, error_for, run_tracked  # noqa: F401
