"""Live progress over WebSockets, through the real ASGI application and Redis channel layer."""

import asyncio
import json

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import connection
from django.test import Client

from mistudio.asgi import application
from models_app import services
from models_app.jobs import run_download
from models_app.models import Model

pytestmark = pytest.mark.django_db(transaction=True)


def session_cookie(user) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


def socket(path: str, cookie: str | None, origin: str = "http://localhost:8000") -> WebsocketCommunicator:
    headers = [(b"origin", origin.encode()), (b"host", b"localhost:8000")]
    if cookie:
        headers.append((b"cookie", f"sessionid={cookie}".encode()))
    return WebsocketCommunicator(application, path, headers=headers)


def run_in_thread_closing_connection(job, *args) -> None:
    """Run a job in a worker thread, closing that thread's database connection after."""
    try:
        job(*args)
    finally:
        connection.close()


async def test_a_jobs_progress_reaches_a_connected_client_as_html_and_json(hub, user):
    hub.bytes_per_second = 500_000
    cookie = await database_sync_to_async(session_cookie)(user)
    model = await database_sync_to_async(services.request_download)(
        user=user, repo_id="tiny/llama", quantization="FP32", enqueue=False
    )
    page = socket("/ws/models/", cookie)
    assert (await page.connect())[0]
    first_html = await page.receive_from()
    assert f'id="model-card-{model.id}"' in first_html and 'hx-swap-oob="true"' in first_html

    events_socket = socket(f"/ws/models/{model.id}/progress", cookie)
    assert (await events_socket.connect())[0]
    assert json.loads(await events_socket.receive_from())["status"] == "queued"

    job = asyncio.create_task(asyncio.to_thread(run_in_thread_closing_connection, run_download, model.id))
    events = []
    while not events or events[-1]["type"] not in ("completed", "error"):
        events.append(json.loads(await events_socket.receive_from(timeout=60)))
    await job

    downloading = [e for e in events if e["type"] == "progress" and e["status"] == "downloading" and 0 < e["progress"] < 100]
    assert downloading, events
    assert all(e["bytes_total"] == downloading[0]["bytes_total"] > 0 for e in downloading)
    done = [e["bytes_done"] for e in downloading]
    assert done == sorted(done) and len(set(done)) == len(done)
    assert any(e["speed_mbps"] > 0 and e["eta_seconds"] is not None for e in downloading)
    completed = events[-1]
    assert completed["type"] == "completed"
    assert completed["memory_required_bytes"] > 0 and completed["disk_size_bytes"] > 0

    html = []
    while not await page.receive_nothing(timeout=0.2):
        html.append(await page.receive_from())
    card_updates = [h for h in html if f'id="model-card-{model.id}"' in h]
    assert any("Download Progress" in h and "MB/s" in h for h in card_updates)
    assert 'data-status="ready"' in card_updates[-1]
    await page.disconnect()
    await events_socket.disconnect()


async def test_a_reconnecting_client_gets_the_current_state_first(user):
    cookie = await database_sync_to_async(session_cookie)(user)
    model = await database_sync_to_async(services.request_download)(
        user=user, repo_id="tiny/llama", quantization="FP32", enqueue=False
    )
    await database_sync_to_async(type(model).objects.filter(pk=model.pk).update)(
        status="downloading", progress=42.5, bytes_done=425, bytes_total=1000
    )
    events_socket = socket(f"/ws/models/{model.id}/progress", cookie)
    assert (await events_socket.connect())[0]
    state = json.loads(await events_socket.receive_from())
    assert (state["status"], state["progress"], state["bytes_done"]) == ("downloading", 42.5, 425)
    await events_socket.disconnect()
    page = socket("/ws/models/", cookie)
    assert (await page.connect())[0]
    assert "42.5%" in await page.receive_from()
    await page.disconnect()


async def refused(communicator: WebsocketCommunicator):
    """Connect, expecting a refusal; then let the application instance finish, so no task
    is left pending when the test's event loop closes."""
    connected, code = await communicator.connect()
    await communicator.disconnect()
    return connected, code


async def test_websockets_refuse_anonymous_users_and_foreign_origins(user):
    connected, code = await refused(socket("/ws/models/", None))
    assert not connected and code == 4401
    cookie = await database_sync_to_async(session_cookie)(user)
    connected, _ = await refused(socket("/ws/models/", cookie, origin="http://evil.example"))
    assert not connected


@pytest.mark.parametrize("model_id", ["m_000000000000", "m_%C3%A9t%C3%A9", "x" * 200])
async def test_progress_for_a_missing_or_malformed_model_id_is_refused(user, model_id):
    cookie = await database_sync_to_async(session_cookie)(user)
    for channel in ("progress", "extraction"):
        connected, code = await refused(socket(f"/ws/models/{model_id}/{channel}", cookie))
        assert not connected and code == 4404


async def test_a_programmatic_client_follows_progress_with_its_api_token_and_no_origin(user):
    from mistudio.models import ApiToken

    model = await database_sync_to_async(Model.objects.create)(name="m", status="downloading", progress=42.0)
    _, raw = await database_sync_to_async(ApiToken.issue)(user)

    def client(token: str) -> WebsocketCommunicator:
        headers = [(b"host", b"localhost:8000"), (b"authorization", f"Bearer {token}".encode())]
        return WebsocketCommunicator(application, f"/ws/models/{model.id}/progress", headers=headers)

    events = client(raw)
    assert (await events.connect())[0]
    assert json.loads(await events.receive_from())["progress"] == 42.0
    await events.disconnect()
    connected, code = await refused(client("mis_not-a-token"))
    assert not connected and code == 4401
    # a cookie session still needs an allowed Origin: no Origin, no socket
    cookie = await database_sync_to_async(session_cookie)(user)
    no_origin = WebsocketCommunicator(application, f"/ws/models/{model.id}/progress",
                                      headers=[(b"host", b"localhost:8000"), (b"cookie", f"sessionid={cookie}".encode())])  # fmt: skip
    connected, _ = await refused(no_origin)
    assert not connected
