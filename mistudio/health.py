"""/healthz: what a load balancer, compose or an operator asks before sending work here."""

from __future__ import annotations

from django.contrib.auth.decorators import login_not_required
from django.db import connection
from django.http import JsonResponse
from django.utils import timezone
from django.views.decorators.http import require_GET
from redis.exceptions import RedisError
from rq.worker import Worker

from . import capacity
from .queue import queue


@login_not_required
@require_GET
def healthz(request):
    """200 when the database and Redis answer (the web server can serve and queue), else
    503. A probe (no sign-in) gets only the status; staff (signed in, or an API token) also
    get what was checked and the live workers, each with its queues, heartbeat, device and
    budget: host names, ports and memory are not for anyone who can reach the port."""
    checks: dict = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        checks["database"] = f"unreachable ({type(exc).__name__})"
    workers = []
    try:
        redis = queue().connection
        redis.ping()
        checks["redis"] = "ok"
        now = timezone.now()
        reported = {c.worker: c for c in capacity.live_workers(redis)}
        for worker in Worker.all(connection=redis):
            heartbeat = worker.last_heartbeat
            own = reported.get(worker.name)
            workers.append({
                "name": worker.name, "state": worker.get_state(), "queues": worker.queue_names(),
                "seconds_since_heartbeat": round((now - heartbeat).total_seconds(), 1) if heartbeat else None,
                "device": own.device if own else None, "device_name": own.device_name if own else None,
                "budget_bytes": own.budget_bytes if own else None,
            })  # fmt: skip
    except RedisError as exc:
        checks["redis"] = f"unreachable ({type(exc).__name__})"
    healthy = checks["database"] == "ok" and checks["redis"] == "ok"
    body = {"status": "ok" if healthy else "unavailable"}
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated and user.is_staff:
        body |= {**checks, "workers": workers}
    return JsonResponse(body, status=200 if healthy else 503)
