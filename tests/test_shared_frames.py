"""A burst of page sockets shares its first frames (issue 17, item 11): 200 sockets opened at
once on the Models page render its list a handful of times, not 200, and a socket never gets
a frame that began reading before it joined its group (a change in between would be lost)."""

import asyncio

import pytest
from channels.db import database_sync_to_async

from models_app.models import Model, ModelStatus
from models_app.tests.test_consumers import session_cookie, socket

pytestmark = pytest.mark.django_db(transaction=True)


async def test_two_hundred_sockets_at_once_share_a_handful_of_renders_and_a_later_change_is_seen(user, monkeypatch):
    model = await database_sync_to_async(Model.objects.create)(name="burst-model", status=ModelStatus.DOWNLOADING, progress=10.0)
    renders = []
    real = Model.list_html.__func__

    def counted(cls, *args, **kwargs):
        renders.append(1)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(Model, "list_html", classmethod(counted))
    cookie = await database_sync_to_async(session_cookie)(user)
    sockets = [socket("/ws/models/", cookie) for _ in range(200)]
    connected = await asyncio.gather(*(s.connect(timeout=30) for s in sockets))
    assert all(ok for ok, _ in connected)
    frames = await asyncio.gather(*(s.receive_from(timeout=30) for s in sockets))
    assert all(f'id="model-card-{model.id}"' in frame and "10.0%" in frame for frame in frames)
    assert len(renders) <= 20, len(renders)  # a handful (2 idle, 6 under the full suite), not 200: each serves every socket joined before it began reading
    before_change = len(renders)

    def finish():
        Model.objects.filter(pk=model.pk).update(status=ModelStatus.READY, progress=100.0)
        Model.objects.get(pk=model.pk).publish()

    await database_sync_to_async(finish)()
    update = await sockets[0].receive_from(timeout=10)  # the open ones hear of it
    assert 'data-status="ready"' in update or "ready" in update.lower()
    late = socket("/ws/models/", cookie)  # within the second the first render is kept
    assert (await late.connect(timeout=10))[0]
    first = await late.receive_from(timeout=10)
    assert "10.0%" not in first and len(renders) == before_change + 1  # rendered again: the change was not hidden
    await asyncio.gather(*(s.disconnect() for s in [*sockets, late]))
