"""The RQ worker class: django-rq's worker, plus the hooks that leave a job's row failed,
not stuck "running", when its process dies: the work horse killed (out of memory, a
signal) is seen at once; a whole worker gone (SIGKILL, a reboot) is seen by RQ's registry
maintenance in any worker, once the job's heartbeat has lapsed (about 90 s; at a worker's
start and every 10 minutes)."""

import os

from django.db import connections
from django.utils.module_loading import autodiscover_modules
from rq.exceptions import AbandonedJobError
from rq.worker import Worker

from . import jobs


def _mark_job_died(job_id: str, reason: str) -> None:
    try:
        jobs.mark_worker_died(job_id, reason)
    finally:
        # The next job forks from this process: it must not inherit an open connection.
        connections.close_all()


def abandoned_job_handler(job, exc_type, exc_value, traceback) -> bool:
    """RQ exception handler: StartedJobRegistry.cleanup calls it with AbandonedJobError for
    a job whose worker stopped sending heartbeats. Other failures are the job's own to record."""
    if exc_type is not None and issubclass(exc_type, AbandonedJobError):
        _mark_job_died(job.id, "its worker stopped while running it")
    return True  # let the other handlers run too


class MistudioWorker(Worker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.push_exc_handler(abandoned_job_handler)

    def work(self, *args, **kwargs):
        # Each job runs in a work horse forked from this process: importing torch and
        # transformers once here saves every job those seconds.
        import torch  # noqa: F401
        import transformers  # noqa: F401

        autodiscover_modules("jobs")  # every app's jobs module

        return super().work(*args, **kwargs)

    def handle_work_horse_killed(self, job, retpid, ret_val, rusage):
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)
        reason = f"signal {os.WTERMSIG(ret_val)}" if ret_val and os.WIFSIGNALED(ret_val) else f"exit status {ret_val}"
        _mark_job_died(job.id, reason)
