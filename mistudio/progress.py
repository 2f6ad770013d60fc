"""The one place that talks to the channel layer.

Jobs and services call these after their database write has committed; events carry
absolute state, so a missed one is healed by the next or by a reload. A channel-layer
outage never fails a job: the row in the database stays the source of truth.
"""

import asyncio
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable

from channels.layers import get_channel_layer

log = logging.getLogger(__name__)
SEND_TIMEOUT_SECONDS = 5


class _LayerLoop:
    """One long-lived event loop per process for sending from synchronous code.

    async_to_sync would start a new loop for every send, and channels-redis keeps its
    connections per loop: every progress event would open a new Redis connection. The
    loop is recreated after a fork (RQ runs each job in a forked work horse)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = 0

    def run(self, coroutine_factory) -> None:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                self._loop = asyncio.new_event_loop()
                self._pid = os.getpid()
                threading.Thread(target=self._loop.run_forever, name="channel-layer", daemon=True).start()
            loop = self._loop
        asyncio.run_coroutine_threadsafe(coroutine_factory(), loop).result(timeout=SEND_TIMEOUT_SECONDS)


_layer_loop = _LayerLoop()

MODELS_GROUP = "models"
DATASETS_GROUP = "datasets"
EXTRACTIONS_GROUP = "extractions"


def model_group(model_id: str, channel: str = "progress") -> str:
    """progress: /ws/models/{id}/progress; extraction: /ws/models/{id}/extraction."""
    return f"model_{model_id}" if channel == "progress" else f"model_{model_id}_{channel}"


def _send(group: str, message: dict) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        _layer_loop.run(lambda: layer.group_send(group, message))
    except Exception as exc:  # noqa: BLE001 - Redis down must not fail the job
        log.warning("could not publish to %s: %s", group, type(exc).__name__)


def publish_html(html: str, group: str = MODELS_GROUP) -> None:
    """HTML fragments for the pages of `group`, swapped out-of-band by element id."""
    _send(group, {"type": "html.fragment", "html": html})


def session_group(session_key: str) -> str:
    """Every socket a browser session opened, so signing out can close them."""
    return "session_" + hashlib.sha256(session_key.encode()).hexdigest()[:32]


def close_session_sockets(session_key: str) -> None:
    _send(session_group(session_key), {"type": "session.ended"})


def user_group(user_id) -> str:
    """Every socket a user opened, by session or API token."""
    return f"user_{user_id}"


def recheck_user_sockets(user_id) -> None:
    """The user's sign-in changed (a token deleted, deactivated, a new password): each of
    their sockets checks whether it is still signed in, and closes if not."""
    _send(user_group(user_id), {"type": "auth.changed"})


def publish_event_to(group: str, event: dict) -> None:
    """A JSON event for the programmatic clients following one row."""
    _send(group, {"type": "json.event", "event": event})


class LatestStateWriter:
    """Runs `write(state)` on a thread of its own for the newest state handed to `submit`,
    at most `max_per_second` times a second; states that arrive in between replace each
    other. The job's own loop (download threads, the forward pass) never waits on the
    database, the template or the channel layer.

    An exception from `write` (JobCancelled when the row was found cancelled) is raised in
    the job's thread at its next `check`, `submit` or `flush`."""

    def __init__(self, write: Callable[[dict], object], name: str, max_per_second: float = 10) -> None:
        self._write = write
        self._name = name
        self._interval = 1 / max_per_second
        self._pending = threading.Condition()
        self._latest: dict | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, state: dict) -> None:
        self.check()
        with self._pending:
            self._latest = state
            self._pending.notify()
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def _run(self) -> None:
        from django.db import connection

        try:
            while True:
                with self._pending:
                    while self._latest is None and not self._stopping:
                        self._pending.wait()
                    if self._latest is None:
                        return
                    state, self._latest = self._latest, None
                started = time.monotonic()
                try:
                    self._write(state)
                except BaseException as exc:  # handed to the job's thread
                    self._error = exc
                    return
                time.sleep(max(0.0, self._interval - (time.monotonic() - started)))
        finally:
            connection.close()  # this thread's own database connection

    def flush(self, raise_error: bool = True) -> None:
        """Write what is pending and stop the thread; then raise what `write` raised, unless
        the job is already leaving with an error of its own (`raise_error=False`)."""
        with self._pending:
            thread, self._thread = self._thread, None
            self._stopping = True
            self._pending.notify()
        if thread is not None:
            thread.join()
        if raise_error:
            self.check()
