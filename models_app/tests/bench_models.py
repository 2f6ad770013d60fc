"""Benchmarks for the download issue. Not tests: they print figures, they do not assert
wall-clock times. Run with `scripts/bench` (pytest -s on this file).

1. Download throughput of the real job path vs plain HTTP fetches of the same files from
   the same loopback server (in a process of its own), in the same run, uncapped and at
   link rates; plus huggingface_hub's bare HTTP client as the ceiling on this machine.
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
from django.db import connection
from django.test import Client

from mistudio import progress
from mistudio.asgi import application
from mistudio.jobs import TrackedJob
from mistudio.models import ApiToken
from mistudio.supervise import web_processes
from models_app.ml import hub as hub_api
from models_app.models import Model, ModelStatus
from models_app.tests.hub_server import HubRepo, hub_in_subprocess, make_sha
from models_app.tests.support import free_port, start_daphne, start_web

pytestmark = pytest.mark.django_db(transaction=True)


def report(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n== {title}")
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")


def plain_fetch(urls: list[str], dest: Path) -> float:
    """urllib GETs of the same files, one after another, 1 MiB reads: the baseline."""
    start = time.perf_counter()
    for url in urls:
        with urllib.request.urlopen(url) as response, dest.open("wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
    return time.perf_counter() - start


def measure_download(plan, endpoint, rounds, tmp_path) -> tuple[list[float], list[float]]:
    """Seconds per round for a plain fetch of the planned files and for the job's path
    (snapshot_download + TrackedJob writing to PostgreSQL and publishing to Redis),
    interleaved so both see the same machine."""
    urls = [f"{endpoint}/{plan.repo_id}/resolve/{plan.sha}/{name}" for name in plan.files]
    plain_times, job_times = [], []
    for _ in range(rounds):
        plain_times.append(plain_fetch(urls, tmp_path / "plain"))
        (tmp_path / "plain").unlink()
        model = Model.objects.create(name="bench", repo_id=plan.repo_id, status=ModelStatus.DOWNLOADING)
        reporter = TrackedJob(model)
        start = time.perf_counter()
        hub_api.download_snapshot(plan, model.raw_dir, None, endpoint, reporter.transfer)
        reporter.flush()
        job_times.append(time.perf_counter() - start)
        model.remove_job_files()
    return plain_times, job_times


def client_ceiling(plan, endpoint, tmp_path, rounds: int = 7) -> tuple[str, str]:
    """huggingface_hub's own HTTP client (httpx) streaming the largest file with nothing else
    around it, against urllib: the ceiling any snapshot_download-based job has on this machine."""
    from huggingface_hub.utils import get_session

    name = max(plan.files, key=plan.file_sizes.__getitem__)
    url = f"{endpoint}/{plan.repo_id}/resolve/{plan.sha}/{name}"
    plain_times, client_times = [], []
    for _ in range(rounds):
        plain_times.append(plain_fetch([url], tmp_path / "plain"))
        start = time.perf_counter()
        with get_session().stream("GET", url) as response, (tmp_path / "plain").open("wb") as out:
            for chunk in response.iter_bytes(chunk_size=hub_api.PROGRESS_CHUNK_BYTES):
                out.write(chunk)
        client_times.append(time.perf_counter() - start)
    size = plan.file_sizes[name] / 1e6
    plain_rate, client_rate = size / statistics.median(plain_times), size / statistics.median(client_times)
    return (
        f"  ceiling: bare httpx stream of {name}",
        f"plain {plain_rate:7.1f} MB/s   httpx {client_rate:5.1f} MB/s ratio {client_rate / plain_rate:5.2f} (median)",
    )


def test_download_throughput_against_a_plain_fetch(smollm2_folder, data_dir, tmp_path):
    repo = HubRepo("HuggingFaceTB/SmolLM2-135M", smollm2_folder, make_sha("HuggingFaceTB/SmolLM2-135M"))
    rows = []
    for cap, rounds in ((None, 7), (400_000_000, 3), (100_000_000, 3), (25_000_000, 3)):
        # The Hub runs in its own process, as a real server does; in this one its threads
        # would hold the GIL the client needs.
        with hub_in_subprocess([repo], cap) as endpoint:
            plan = hub_api.plan_download(repo.repo_id, "main", None, endpoint)
            plain, job = measure_download(plan, endpoint, rounds, tmp_path)
            if cap is None:
                client_row = client_ceiling(plan, endpoint, tmp_path)
        label = "uncapped loopback" if cap is None else f"link capped at {cap / 1e6:.0f} MB/s"
        plain_rate, job_rate = plan.total_bytes / statistics.median(plain) / 1e6, plan.total_bytes / statistics.median(job) / 1e6
        best_ratio = min(plain) / min(job)
        rows.append(
            (
                f"{label} ({rounds} rounds)",
                f"plain {plain_rate:7.1f} MB/s   job {job_rate:7.1f} MB/s   ratio {job_rate / plain_rate:5.2f} (median)"
                f"   {best_ratio:5.2f} (best of each)",
            )
        )
    rows.append(client_row)
    rows.append(("target", "ratio >= 0.9"))
    report(
        f"Download throughput, SmolLM2-135M ({plan.total_bytes / 1e6:.0f} MB in {len(plan.files)} files) from a loopback "
        "Hub in its own process: the job's path (snapshot_download, progress to PostgreSQL + Redis) vs plain urllib "
        "GETs of the same files",
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


def monitor_connection():
    """One connection held for counting, opened before the load (the load may use up the rest)."""
    import psycopg

    db = connection.settings_dict
    return psycopg.connect(host=db["HOST"] or "127.0.0.1", port=db["PORT"] or 5432, user=db["USER"], dbname="postgres",
                           autocommit=True)  # fmt: skip


def database_connections(monitor) -> int:
    """Connections to this test database right now, as PostgreSQL counts them."""
    name = connection.settings_dict["NAME"]
    return monitor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,)).fetchone()[0]


def open_loop_load(url: str, headers: dict, rate: float, seconds: float, monitor, clients: int = 64) -> dict:
    """GETs sent at a fixed rate whatever the answers (an open loop, as independent clients
    would), from `clients` keep-alive connections, bounded in count and time, with the
    database's connection count sampled."""
    import http.client
    import queue as queue_module
    import threading
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    results: list[tuple[int, float]] = []
    peak = [0]
    stop = threading.Event()
    due: queue_module.Queue = queue_module.Queue()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], database_connections(monitor))
            stop.wait(0.05)

    def client() -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        while (scheduled := due.get()) is not None:
            try:
                conn.request("GET", target, headers=headers)
                response = conn.getresponse()
                response.read()
                status = response.status
            except OSError:
                status = 0
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            results.append((status, (time.perf_counter() - scheduled) * 1000))  # from when it was due
        conn.close()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    begin = time.perf_counter()
    for i in range(int(rate * seconds)):
        scheduled = begin + i / rate
        time.sleep(max(0.0, scheduled - time.perf_counter()))
        due.put(scheduled)
    for _ in threads:
        due.put(None)
    for thread in threads:
        thread.join(timeout=60)
    stop.set()
    sampler.join()
    latencies = sorted(ms for _, ms in results)
    return {
        "requests": len(results), "errors": sum(1 for status, _ in results if status != 200),
        "p50": statistics.median(latencies), "p95": latencies[int(len(latencies) * 0.95) - 1], "peak_connections": peak[0],
    }  # fmt: skip


@pytest.mark.timeout(900)
def test_list_api_under_load_keeps_database_connections_bounded(user):
    config = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "vocab_size": 49152}
    Model.objects.bulk_create(
        [Model(name=f"model-{i}", repo_id=f"org/model-{i}", status=ModelStatus.READY, architecture="llama",
               params_count=134_515_008, architecture_config=config) for i in range(1000)]
    )  # fmt: skip
    _, token = ApiToken.issue(user)
    processes = web_processes()
    rows = []
    # The baseline is one daphne process; then the web server as scripts/run runs it.
    for label, start in (("1 daphne process (baseline)", start_daphne),
                         (f"scripts/run's web server: {processes} daphne processes, one socket",
                          lambda port: start_web(port, processes))):  # fmt: skip
        port = free_port()
        server = start(port)
        monitor = monitor_connection()
        try:
            idle_before = database_connections(monitor)
            figures = open_loop_load(f"http://127.0.0.1:{port}/api/models", {"Authorization": f"Bearer {token}"}, 100, 30,
                                     monitor)  # fmt: skip
            time.sleep(2)
            idle_after = database_connections(monitor)
        finally:
            server.terminate()
            server.wait(timeout=20)
            monitor.close()
        rows += [
            (label, ""),
            ("  requests / errors", f"{figures['requests']} / {figures['errors']}"),
            ("  latency", f"p50 {figures['p50']:7.1f} ms   p95 {figures['p95']:7.1f} ms"),
            ("  database connections", f"peak {figures['peak_connections']} (before {idle_before}, 2 s after {idle_after})"),
        ]
        if label.startswith("1 "):
            baseline = figures["p95"]
    rows.append(("p95, baseline / scripts/run", f"{baseline / figures['p95']:.1f}x"))
    rows.append(("target", "0 errors, p95 < 100 ms, at most 40 connections at any moment"))
    report("GET /api/models (1,000 records, 20 per page) at 100 requests/s for 30 s", rows)


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
        await asyncio.to_thread(progress.publish_event_to, progress.model_group(model.id), {"type": "progress", "progress": i, "sent": sent})
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


async def websocket_burst(port: int, token: str, model_id: str, clients: int, events: int, page: bool = False) -> dict:
    """`clients` sockets opened at once; then `events` progress events, each timed from the
    publish to its arrival at every socket. `page`: the Models page's own socket
    (/ws/models/, whose first frame is the list of cards) instead of the JSON events."""
    import websockets

    url = f"ws://127.0.0.1:{port}/ws/models/" if page else f"ws://127.0.0.1:{port}/ws/models/{model_id}/progress"

    async def connect():
        try:
            ws = await websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=60,
                                          max_queue=None)  # fmt: skip
            await asyncio.wait_for(ws.recv(), 30)  # the current state, first
            return ws
        except Exception as exc:  # noqa: BLE001 - counted
            return exc

    opened = await asyncio.gather(*(connect() for _ in range(clients)))
    sockets = [ws for ws in opened if not isinstance(ws, Exception)]
    failures = [type(ws).__name__ for ws in opened if isinstance(ws, Exception)]

    async def arrival(ws) -> float:
        frame = await asyncio.wait_for(ws.recv(), 30)
        sent = float(frame.split('data-sent="', 1)[1].split('"', 1)[0]) if page else json.loads(frame)["sent"]
        return (time.time() - sent) * 1000

    delays: list[float] = []
    for i in range(events):
        waiting = [asyncio.create_task(arrival(ws)) for ws in sockets]
        await asyncio.sleep(0.05)
        if page:  # a card as a job publishes it, stamped
            html = f'<div id="model-card-{model_id}" hx-swap-oob="true" data-sent="{time.time()}">{i}</div>'
            await asyncio.to_thread(progress.publish_html, html, progress.MODELS_GROUP)
        else:
            event = {"type": "progress", "progress": i, "sent": time.time()}
            await asyncio.to_thread(progress.publish_event_to, progress.model_group(model_id), event)
        delays += await asyncio.gather(*waiting)
    await asyncio.gather(*(ws.close() for ws in sockets))
    delays.sort()
    return {"connected": len(sockets), "failures": failures, "p50": statistics.median(delays),
            "p95": delays[int(len(delays) * 0.95) - 1]}  # fmt: skip


@pytest.mark.timeout(600)
def test_websocket_burst_fan_out_and_list_sizes_with_1000_models(user, signed_in_client):
    config = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "vocab_size": 49152}
    Model.objects.bulk_create(
        [Model(name=f"model-{i}", repo_id=f"org/model-{i}", status=ModelStatus.READY, architecture="llama",
               params_count=134_515_008, architecture_config=config) for i in range(1000)]
    )  # fmt: skip
    panel = len(signed_in_client.get("/").content)
    first_frame = len(Model.list_html(oob=True).encode())
    added = Model.objects.create(name="one-more", status=ModelStatus.QUEUED)
    from django.template.loader import render_to_string

    added_frame = len(render_to_string("models_app/_card_added.html", {"model": added}).encode())
    model = Model.objects.create(name="bench", status=ModelStatus.DOWNLOADING)
    _, token = ApiToken.issue(user)
    processes = web_processes()
    rows = []
    for label, start, page in (("1 daphne process (baseline), JSON event sockets", start_daphne, False),
                               (f"scripts/run's web server: {processes} daphne processes, JSON event sockets",
                                lambda port: start_web(port, processes), False),
                               ("1 daphne process, Models page sockets (first frame: 20 of 1,000 cards)", start_daphne, True),
                               (f"scripts/run's web server: {processes} daphne processes, Models page sockets",
                                lambda port: start_web(port, processes), True)):  # fmt: skip
        port = free_port()
        server = start(port)
        try:
            figures = asyncio.run(websocket_burst(port, token, model.id, clients=500, events=20, page=page))
        finally:
            server.terminate()
            server.wait(timeout=20)
        rows += [
            (label, ""),
            ("  connected / failed", f"{figures['connected']} / {len(figures['failures'])} {sorted(set(figures['failures']))}"),
            ("  delivery, publish -> every client", f"p50 {figures['p50']:7.1f} ms   p95 {figures['p95']:7.1f} ms"),
        ]
    report(
        "WebSockets: 500 /ws/models/{id}/progress clients opened at once, then 20 events to all",
        rows + [
            ("Models page HTML, 1,000 models", f"{panel / 1000:7.1f} KB"),
            ("first /ws/models/ frame", f"{first_frame / 1000:7.1f} KB"),
            ("frame for one added card", f"{added_frame / 1000:7.1f} KB"),
            ("target", "0 failures, p95 < 100 ms; page < 100 KB; a change sends only its card"),
        ],
    )


@pytest.fixture
def signed_in_client(user):
    client = Client()
    client.force_login(user)
    return client
