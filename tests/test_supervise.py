"""scripts/run as an operator leaves it running for weeks: a worker killed with -9 is back
within 10 s and the web server stays up, and the reverse; /healthz tells what is alive."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from models_app.tests.support import ROOT, child_pids, free_port, subprocess_env, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def healthz(port: int, token: str | None = None) -> dict | None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/healthz",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())
    except OSError:
        return None


@pytest.fixture
def staff_token(django_user_model):
    from mistudio.models import ApiToken

    staff = django_user_model.objects.create_user("operator", password="pw-for-health-checks", is_staff=True)
    return ApiToken.issue(staff)[1]


def pids_with(*parts: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if all(part in command for part in parts):
            found.append(int(entry.name))
    return found


def test_healthz_reports_the_database_redis_and_live_workers(client, admin_client, user, redis_clean):
    from models_app.tests.support import start_worker

    assert client.get("/healthz").json() == {"status": "ok"}  # a probe (no sign-in) learns only that
    client.force_login(user)
    assert client.get("/healthz").json() == {"status": "ok"}  # nor does a user who is not staff
    body = admin_client.get("/healthz").json()
    assert (body["status"], body["database"], body["redis"]) == ("ok", "ok", "ok")
    worker = start_worker(burst=False)
    try:
        wait_for(lambda: admin_client.get("/healthz").json()["workers"], timeout=60, message="the worker to register")
        assert client.get("/healthz").json() == {"status": "ok"}
        (live,) = admin_client.get("/healthz").json()["workers"]
        assert live["queues"] == ["cpu", "default"] and live["device"] == "cpu" and live["budget_bytes"] > 0 and live["seconds_since_heartbeat"] < 60
    finally:
        worker.terminate()
        worker.communicate(timeout=30)


def test_healthz_is_503_when_redis_is_gone(client, admin_client, settings):
    settings.RQ_QUEUES = {"default": {"URL": "redis://127.0.0.1:1/0", "DEFAULT_TIMEOUT": 60}}
    response = client.get("/healthz")
    assert response.status_code == 503 and response.json() == {"status": "unavailable"}
    response = admin_client.get("/healthz")
    assert response.status_code == 503 and response.json()["redis"].startswith("unreachable")


def test_scripts_run_restarts_a_killed_worker_and_a_killed_web_server(redis_clean, staff_token):
    port = free_port()
    worker_name = f"mistudio-{socket.gethostname()}-{port}-1"
    env = subprocess_env(MISTUDIO_PORT=str(port), MISTUDIO_ADMIN_PASSWORD="correct horse battery", MISTUDIO_WEB_PROCESSES="2")
    run = subprocess.Popen(["scripts/run"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)  # fmt: skip
    try:
        wait_for(lambda: (healthz(port, staff_token) or {}).get("workers") and pids_with("rqworker", worker_name), timeout=120,
                 interval=0.3, message="scripts/run to serve with a worker")  # fmt: skip
        (worker,) = pids_with("rqworker", worker_name)
        wait_for(lambda: len(child_pids(run.pid, "mistudio.webserver")) == 2, timeout=30, message="both web processes")
        webs = sorted(child_pids(run.pid, "mistudio.webserver"))
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: [p for p in pids_with("rqworker", worker_name) if p != worker], timeout=10, interval=0.1,
                 message="the worker to be restarted")  # fmt: skip
        assert time.monotonic() - killed < 10
        assert healthz(port)["status"] == "ok" and sorted(child_pids(run.pid, "mistudio.webserver")) == webs

        (worker,) = pids_with("rqworker", worker_name)
        os.kill(webs[0], signal.SIGKILL)  # the other goes on answering on the same socket meanwhile
        killed = time.monotonic()
        assert healthz(port)["status"] == "ok"
        wait_for(lambda: len(set(child_pids(run.pid, "mistudio.webserver")) - {webs[0]}) == 2, timeout=10, interval=0.1,
                 message="the web process to be restarted")  # fmt: skip
        assert time.monotonic() - killed < 10
        webs = child_pids(run.pid, "mistudio.webserver")
        for pid in webs:  # and the whole web server
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: (healthz(port) or {}).get("status") == "ok", timeout=10, interval=0.1, message="the web server")
        assert time.monotonic() - killed < 10
        assert pids_with("rqworker", worker_name) == [worker]
        webs = child_pids(run.pid, "mistudio.webserver")
    finally:
        os.killpg(run.pid, signal.SIGTERM)
        try:
            output, _ = run.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            output, _ = run.communicate()
    assert "restarting" in output
    assert not pids_with("rqworker", worker_name) and not [pid for pid in webs if Path(f"/proc/{pid}").exists()]


def test_with_no_redis_anywhere_scripts_run_starts_a_private_one_in_the_data_dir(tmp_path, monkeypatch):
    from mistudio import supervise

    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setattr(supervise, "DEFAULT_REDIS", ("127.0.0.1", free_port()))  # where nothing listens
    supervisor = supervise.Supervisor("127.0.0.1", free_port(), 1, tmp_path)
    (redis,) = [child for child in supervisor.children if child.name == "redis"]
    url = supervisor.env["REDIS_URL"]
    redis.start(supervisor.env)
    try:
        supervisor._wait_for_redis()
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert supervise.answers_ping("127.0.0.1", port)
        assert (tmp_path / "redis").is_dir()
    finally:
        redis.process.terminate()
        redis.process.wait(timeout=10)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # an explicit one is never replaced
    explicit = supervise.Supervisor("127.0.0.1", free_port(), 1, tmp_path)
    assert explicit.env["REDIS_URL"] == "redis://127.0.0.1:1/0"
    assert not [child for child in explicit.children if child.name == "redis"]
