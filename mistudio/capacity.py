"""What each live worker can hold, and which device-class queue a job goes to.

Every worker writes its device, its memory budget and the queue it serves into Redis with
its heartbeat (a key that lapses when the heartbeats stop). A request that needs memory is
judged against those budgets, not against the web host's own memory: a CPU-only web host
in front of a GPU worker would otherwise refuse what the GPU holds, or accept what it
cannot. With no worker reporting (none started yet) the request is judged on this machine
and goes to the shared queue; the job checks again on its own machine before it loads."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from django.conf import settings
from redis.exceptions import RedisError

from .devices import compute_device, device_class, device_name, memory_budget
from .errors import ServiceError
from .hub import format_bytes

KEY_PREFIX = "mistudio:capacity:"
SHARED_QUEUE = "default"


@dataclass(frozen=True)
class Capacity:
    worker: str
    queue: str  # the device-class queue it serves (besides the shared one)
    device: str  # "cuda" or "cpu": what the memory estimates depend on
    device_name: str
    budget_bytes: int
    host: str
    busy: bool = False
    updated: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.worker} ({self.queue}, {self.device_name}, {format_bytes(self.budget_bytes)} budget)"


def this_machine(worker: str = "this machine", busy: bool = False, fork_safe: bool = False) -> Capacity:
    """`fork_safe`: measured without initializing CUDA (a worker's main process)."""
    device = compute_device()
    return Capacity(
        worker=worker, queue=worker_queue(device), device=device, device_name=device_name(device, fork_safe),
        budget_bytes=memory_budget(settings.GPU_MEMORY_LIMIT, device, fork_safe), host=socket.gethostname(),
        busy=busy, updated=time.time(),
    )  # fmt: skip


def worker_queue(device: str) -> str:
    return settings.WORKER_CLASS or device_class(device)


def publish(connection, capacity: Capacity, ttl_seconds: int) -> None:
    connection.set(KEY_PREFIX + capacity.worker, json.dumps(asdict(capacity)), ex=ttl_seconds)


def withdraw(connection, worker: str) -> None:
    connection.delete(KEY_PREFIX + worker)


def live_workers(connection) -> list[Capacity]:
    found = []
    for key in connection.scan_iter(match=KEY_PREFIX + "*", count=100):
        raw = connection.get(key)
        if raw:
            try:
                found.append(Capacity(**json.loads(raw)))
            except (TypeError, ValueError):
                continue
    return sorted(found, key=lambda c: c.worker)


def reported_workers() -> list[Capacity]:
    """The live workers' records; none when Redis does not answer (judged on this machine)."""
    from .queue import queue

    try:
        return live_workers(queue().connection)
    except RedisError:
        return []


@dataclass(frozen=True)
class Verdict:
    """A worker judged for one job: `refusal` says why it cannot hold it (None: it can);
    `exact` is False when it can only by falling back (a smaller format than asked)."""

    refusal: str | None = None
    exact: bool = True


@dataclass(frozen=True)
class Placement:
    queue: str
    capacity: Capacity
    reported: bool  # False: no worker reported, judged on the web host

    @property
    def note(self) -> str:
        how = "counted on" if self.reported else "no worker has reported its memory yet; judged on"
        return f"{how} {self.capacity.label}"


def place(judge: Callable[[Capacity], Verdict], workers: list[Capacity] | None = None) -> Placement:
    """The queue of a live worker that can hold the job: one that holds it as asked before
    one that must fall back, a GPU before a CPU, then the largest budget. Refused, naming
    every worker and why, when none can. `workers`: the records already read (several
    judgements at once), else read now."""
    workers = reported_workers() if workers is None else workers
    if not workers:
        local = this_machine()
        verdict = judge(local)
        if verdict.refusal:
            raise ServiceError("does_not_fit", verdict.refusal, details={"budget_bytes": local.budget_bytes})
        return Placement(SHARED_QUEUE, local, reported=False)
    verdicts = [(worker, judge(worker)) for worker in workers]
    fitting = [(w, v) for w, v in verdicts if v.refusal is None]
    if not fitting:
        reasons = "; ".join(f"{w.label}: {v.refusal}" for w, v in verdicts)
        raise ServiceError(
            "does_not_fit", f"No live worker can hold it. {reasons}",
            details={"workers": [{"worker": w.worker, "queue": w.queue, "budget_bytes": w.budget_bytes} for w in workers]},
        )  # fmt: skip
    best, _ = max(fitting, key=lambda wv: (wv[1].exact, wv[0].device == "cuda", wv[0].budget_bytes))
    return Placement(best.queue, best, reported=True)


def queue_or_shared(judge: Callable[[Capacity], Verdict]) -> str:
    """Where a job goes when a refusal is the job's own to record (a retry): the placed
    queue, else the shared one."""
    try:
        return place(judge).queue
    except ServiceError:
        return SHARED_QUEUE
