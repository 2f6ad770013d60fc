"""The one place that talks to the channel layer.

Jobs and services call these after their database write has committed; events carry
absolute state, so a missed one is healed by the next or by a reload. A channel-layer
outage never fails a job: the row in the database stays the source of truth.
"""

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

log = logging.getLogger(__name__)

MODELS_GROUP = "models"


def model_group(model_id: str) -> str:
    return f"model_{model_id}"


def _send(group: str, message: dict) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(group, message)
    except Exception as exc:  # noqa: BLE001 - Redis down must not fail the job
        log.warning("could not publish to %s: %s", group, type(exc).__name__)


def publish_html(html: str) -> None:
    """HTML fragments for the page, swapped out-of-band by element id."""
    _send(MODELS_GROUP, {"type": "html.fragment", "html": html})


def publish_event(model_id: str, event: dict) -> None:
    """A JSON event for programmatic clients of /ws/models/{id}/…."""
    _send(model_group(model_id), {"type": "json.event", "event": event})
