"""Benchmarks for the download issue. Not tests: they print figures, they do not assert
wall-clock times. Run with `scripts/bench` (pytest -s on this file).

1. Download throughput of the real job path vs a plain HTTP fetch of the same file from
   the same loopback server, in the same run.
2. GET /api/models latency with 1,000 records, through daphne, p50/p95.
3. Delay from publishing a progress event to a connected WebSocket client receiving it.
"""

import asyncio
import json
import statistics
import time
import urllib.request
from pathlib import Path

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client

from mistudio import progress
from mistudio.asgi import application
from mistudio.models import ApiToken
from models_app import services
from models_app.jobs import JobProgress
from models_app.ml import hub as hub_api
from models_app.models import Model, ModelStatus
from models_app.tests.support import free_port, start_daphne

pytestmark = pytest.mark.django_db(transaction=True)


def report(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n== {title}")
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")


def plain_fetch(url: str, dest: Path) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(url) as response, dest.open("wb") as out:
        while chunk := response.read(1 << 20):
            out.write(chunk)
    return time.perf_counter() - start


def measure_download(plan, url, size, settings, tmp_path) -> tuple[float, float]:
    """Best of 3: plain fetch seconds, job-path seconds."""
    plain_times, job_times = [], []
    for attempt in range(3):
        plain_times.append(plain_fetch(url, tmp_path / "plain"))
        (tmp_path / "plain").unlink()
        model = Model.objects.create(name="bench", repo_id=plan.repo_id, status=ModelStatus.DOWNLOADING)
        reporter = JobProgress(model.id)
        start = time.perf_counter()
        hub_api.download_snapshot(plan, model.raw_dir, None, settings.HF_ENDPOINT, reporter.transfer)
        reporter.flush()
        job_times.append(time.perf_counter() - start)
        services.remove_files(model)
    return min(plain_times), min(job_times)


def test_download_throughput_against_a_plain_fetch(hub_with_smollm2, settings, tmp_path):
    repo = "HuggingFaceTB/SmolLM2-135M"
    plan = hub_api.plan_download(repo, "main", None, settings.HF_ENDPOINT)
    weights = "model.safetensors"
    size = plan.file_sizes[weights]
    url = f"{settings.HF_ENDPOINT}/{repo}/resolve/{plan.sha}/{weights}"
    rows = []
    for cap in (None, 100_000_000, 25_000_000):
        hub_with_smollm2.bytes_per_second = cap
        plain, job = measure_download(plan, url, size, settings, tmp_path)
        label = "uncapped loopback" if cap is None else f"link capped at {cap / 1e6:.0f} MB/s"
        plain_rate, job_rate = size / plain / 1e6, plan.total_bytes / job / 1e6
        rows.append((label, f"plain {plain_rate:7.1f} MB/s   job {job_rate:7.1f} MB/s   ratio {job_rate / plain_rate:5.2f}"))
    rows.append(("target", "ratio >= 0.9"))
    report(
        f"Download throughput, SmolLM2-135M from the loopback Hub, best of 3 (job: {plan.total_bytes / 1e6:.0f} MB "
        f"in {len(plan.files)} files with progress to PostgreSQL + Redis; plain: urllib GET of the {size / 1e6:.0f} MB "
        "weights file)",
        rows,
    )


def test_list_api_latency_with_1000_records(user, hub):
    config = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "vocab_size": 49152}
    Model.objects.bulk_create(
        [
            Model(
                name=f"model-{i}",
                repo_id=f"org/model-{i}",
                status=ModelStatus.READY if i % 10 else ModelStatus.ERROR,
                architecture="llama",
                params_count=134_515_008,
                architecture_config=config,
            )
            for i in range(1000)
        ]
    )
    _, token = ApiToken.issue(user)
    port = free_port()
    server = start_daphne(port)
    try:
        rows = []
        for query in ("", "?limit=100", "?status=error&search=model-9"):
            samples = []
            for i in range(220):
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api/models{query}", headers={"Authorization": f"Bearer {token}"}
                )
                start = time.perf_counter()
                with urllib.request.urlopen(request) as response:
                    body = json.loads(response.read())
                if i >= 20:  # warm-up excluded
                    samples.append((time.perf_counter() - start) * 1000)
            assert body["pagination"]["total"] > 0
            samples.sort()
            p50 = statistics.median(samples)
            p95 = samples[int(len(samples) * 0.95) - 1]
            rows.append((f"GET /api/models{query or ' (20 per page)'}", f"p50 {p50:6.1f} ms   p95 {p95:6.1f} ms"))
        rows.append(("target", "p95 < 100 ms"))
        report("API latency through daphne, 1,000 records, 200 requests each", rows)
    finally:
        server.terminate()
        server.wait(timeout=10)


async def test_progress_event_delay_to_a_websocket_client(user):
    def session_cookie() -> str:
        client = Client()
        client.force_login(user)
        return client.cookies["sessionid"].value

    cookie = await database_sync_to_async(session_cookie)()
    model = await database_sync_to_async(Model.objects.create)(name="bench", status=ModelStatus.DOWNLOADING)
    socket = WebsocketCommunicator(
        application,
        f"/ws/models/{model.id}/progress",
        headers=[(b"origin", b"http://localhost"), (b"host", b"localhost"), (b"cookie", f"sessionid={cookie}".encode())],
    )
    assert (await socket.connect())[0]
    await socket.receive_from()
    delays = []
    for i in range(200):
        sent = time.perf_counter()
        await asyncio.to_thread(progress.publish_event, model.id, {"type": "progress", "progress": i, "sent": sent})
        event = json.loads(await socket.receive_from(timeout=5))
        delays.append((time.perf_counter() - event["sent"]) * 1000)
    await socket.disconnect()
    delays.sort()
    report(
        "Progress event delay, publish (job side) -> Redis channel layer -> consumer -> client, 200 events",
        [
            ("p50", f"{statistics.median(delays):6.2f} ms"),
            ("p95", f"{delays[int(len(delays) * 0.95) - 1]:6.2f} ms"),
            ("max", f"{delays[-1]:6.2f} ms"),
            ("target", "< 50 ms"),
        ],
    )
