"""The one place that talks to the channel layer.

Jobs and services call these after their database write has committed; events carry
absolute state, so a missed one is healed by the next or by a reload. A channel-layer
outage never fails a job: the row in the database stays the source of truth.
"""

import asyncio
import logging
import os
import threading

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


def publish_html(html: str) -> None:
    """HTML fragments for the page, swapped out-of-band by element id."""
    _send(MODELS_GROUP, {"type": "html.fragment", "html": html})


def publish_event(model_id: str, event: dict, channel: str = "progress") -> None:
    """A JSON event for programmatic clients of /ws/models/{id}/progress or …/extraction."""
    _send(model_group(model_id, channel), {"type": "json.event", "event": event})
