"""The RQ worker class: django-rq's worker, plus the hooks that leave a job's row failed,
not stuck "running", when its process dies: the work horse killed (out of memory, a
signal) is seen at once; a whole worker gone (SIGKILL, a reboot) is seen by RQ's registry
maintenance in any worker, once the job's heartbeat has lapsed (about 90 s; at a worker's
start and every 10 minutes)."""

import dataclasses
import os
import sys
import time

from django.apps import apps
from django.conf import settings
from django.db import DatabaseError, connections
from django.utils.module_loading import autodiscover_modules
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq.exceptions import AbandonedJobError
from rq.queue import Queue
from rq.worker import Worker

from . import capacity, jobs
from .devices import compute_device
from .supervise import die_with_parent


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


# A dead worker's job is found once its heartbeat lapses (job_monitoring_interval + 60 s)
# by the registry check, which every live worker runs this often: together, under 2 minutes.
# (settings.JOB_MONITORING_SECONDS, 15 s by default, is how often a busy worker beats.)
MAINTENANCE_SECONDS = 30
# An idle worker heartbeats every WORKER_TTL - 15 s (RQ's dequeue timeout), a busy one every
# settings.JOB_MONITORING_SECONDS; its capacity record lapses after three missed beats.
WORKER_TTL = 30
CAPACITY_TTL = 45


class MistudioWorker(Worker):
    """Serves its device class's queue first (gpu, cpu or MISTUDIO_WORKER_CLASS), then the
    queues it was started with, and reports its device and memory budget with every heartbeat."""

    def __init__(self, queues, *args, **kwargs):
        kwargs.setdefault("worker_ttl", WORKER_TTL)
        queues = [queues] if isinstance(queues, str | Queue) else list(queues)
        first = queues[0]
        connection = kwargs.get("connection") or getattr(first, "connection", None)
        own = capacity.worker_queue(compute_device())
        if own not in [getattr(q, "name", q) for q in queues]:
            queues.insert(0, type(first)(own, connection=connection) if isinstance(first, Queue) else own)
        super().__init__(queues, *args, **kwargs)
        self.push_exc_handler(abandoned_job_handler)
        self.job_monitoring_interval = min(self.job_monitoring_interval, settings.JOB_MONITORING_SECONDS)
        self.maintenance_interval = min(self.maintenance_interval, MAINTENANCE_SECONDS)
        self._idle_capacity: capacity.Capacity | None = None

    def heartbeat(self, timeout=None, pipeline=None):
        super().heartbeat(timeout, pipeline)
        self.report_capacity()

    def maintain_heartbeats(self, job, execution):
        """While a job runs, a lost Redis must not end the worker: RQ's own monitor lets the
        heartbeat's ConnectionError out, and the worker process exited ~12 s into an outage,
        taking the running job with it. The job needs no Redis to go on (its row and progress
        are in PostgreSQL; a progress event that cannot be published is dropped), so the
        beat is skipped and tried again at the next interval. Once Redis is back, the beats
        resume; an outage longer than the job's heartbeat TTL (settings.JOB_MONITORING_SECONDS + 60 s)
        lets another worker's maintenance find the job abandoned, as for a dead worker."""
        try:
            super().maintain_heartbeats(job, execution)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            self.log.warning("Worker %s: Redis unreachable (%s); job %s goes on, heartbeat skipped", self.name,
                             type(exc).__name__, job.id)  # fmt: skip

    def report_capacity(self) -> None:
        """While a job runs, its own memory is in use: the budget reported is the one measured
        when last idle (what the next job will have)."""
        busy = self.get_current_job_id() is not None
        if busy and self._idle_capacity is not None:
            record = dataclasses.replace(self._idle_capacity, busy=True, updated=time.time())
        else:
            record = self._idle_capacity = capacity.this_machine(self.name, busy=busy, fork_safe=True)
        try:
            capacity.publish(self.connection, record, CAPACITY_TTL)
        except RedisError:
            pass  # the next heartbeat tries again; RQ itself reports the lost connection

    def run_maintenance_tasks(self):
        """RQ's registry clean-up (which finds the jobs of dead workers), then ours: queued
        rows whose job is gone are queued again or failed (jobs.reap_stranded)."""
        super().run_maintenance_tasks()
        try:
            reaped = jobs.reap_stranded()
            if reaped:
                self.log.warning("Worker %s: %d queued row(s) had lost their job; queued again or failed", self.name, reaped)
        except DatabaseError as exc:
            self.log.warning("Worker %s: stranded rows not checked (%s)", self.name, type(exc).__name__)
        finally:
            connections.close_all()  # the next job forks from this process

    def register_death(self, *args, **kwargs):
        try:
            capacity.withdraw(self.connection, self.name)
        except RedisError:
            pass
        return super().register_death(*args, **kwargs)

    def main_work_horse(self, job, queue):
        die_with_parent()  # a work horse must not outlive its worker (kill -9): the row is failed by the next registry check
        return super().main_work_horse(job, queue)

    def work(self, *args, **kwargs):
        # Each job runs in a work horse forked from this process: what every job would load
        # again is loaded once here. torch and transformers with its modelling code (about
        # 3.5 s of a job's start on this 2-core CPU: transformers imports its model classes
        # lazily, at a job's first from_pretrained), then each app's own (an app's jobs
        # module may define warm_up_worker(): the extraction's compiled statistics).
        import torch  # noqa: F401
        import transformers.modeling_utils  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

        autodiscover_modules("jobs")  # every app's jobs module
        for config in apps.get_app_configs():
            warm_up = getattr(sys.modules.get(f"{config.name}.jobs"), "warm_up_worker", None)
            if warm_up is not None:
                warm_up()

        return super().work(*args, **kwargs)

    def handle_work_horse_killed(self, job, retpid, ret_val, rusage):
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)
        reason = f"signal {os.WTERMSIG(ret_val)}" if ret_val and os.WIFSIGNALED(ret_val) else f"exit status {ret_val}"
        _mark_job_died(job.id, reason)
