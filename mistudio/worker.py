"""The RQ worker class: django-rq's worker, plus a hook so a job whose process dies
(killed, out of memory) leaves its row failed instead of stuck "running"."""

import os

from django.db import connections
from rq.worker import Worker


class MistudioWorker(Worker):
    def work(self, *args, **kwargs):
        # Each job runs in a work horse forked from this process: importing torch and
        # transformers once here saves every job those seconds.
        import torch  # noqa: F401
        import transformers  # noqa: F401

        import activations_app.jobs  # noqa: F401
        import models_app.jobs  # noqa: F401

        return super().work(*args, **kwargs)

    def handle_work_horse_killed(self, job, retpid, ret_val, rusage):
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)
        from activations_app.jobs import mark_worker_died as extraction_died
        from models_app.jobs import mark_worker_died as model_job_died

        reason = f"signal {os.WTERMSIG(ret_val)}" if ret_val and os.WIFSIGNALED(ret_val) else f"exit status {ret_val}"
        try:
            model_job_died(job.id, reason)
            extraction_died(job.id, reason)
        finally:
            # The next job forks from this process: it must not inherit an open connection.
            connections.close_all()
