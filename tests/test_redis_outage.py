"""A Redis outage of up to a minute loses no running job (issue 17, item 3): the worker and
its work horse ride it out (the heartbeat that cannot be sent is skipped, a progress event
that cannot be published is dropped; the row's state is in PostgreSQL), and a WebSocket
opened during the outage is closed with 1013 (try again later), on which the page's htmx
ws reconnects, instead of failing its handshake with HTTP 500."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest
from channels.db import database_sync_to_async

from models_app.models import Model, ModelStatus
from models_app.tests.support import ROOT, free_port, start_worker, stop, subprocess_env, wait_for
from models_app.tests.test_consumers import session_cookie, socket

pytestmark = pytest.mark.django_db(transaction=True)


class PrivateRedis:
    """A redis-server of this test's own, every write on disk (appendfsync always), so that
    stopping and starting it again is an outage that loses nothing, as a restarted Redis
    with persistence is."""

    def __init__(self, folder) -> None:
        self.port, self.folder, self.process = free_port(), folder, None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen([shutil.which("redis-server"), "--bind", "127.0.0.1", "--port", str(self.port),
                                         "--dir", str(self.folder), "--appendonly", "yes", "--appendfsync", "always",
                                         "--save", ""], stdout=subprocess.DEVNULL)  # fmt: skip
        wait_for(self.answers, timeout=10, message="redis-server up")

    def answers(self) -> bool:
        return subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True).stdout.strip() == "PONG"

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def test_a_download_running_through_a_redis_outage_ends_ready_and_its_worker_lives(hub, data_dir, tmp_path, tiny_repo_folder):
    redis = PrivateRedis(tmp_path)
    redis.start()
    env = {"REDIS_URL": redis.url, "MISTUDIO_TEST_OWN_REDIS": "1", "MISTUDIO_JOB_MONITORING_SECONDS": "1"}
    worker = None
    try:
        hub.bytes_per_second = 220_000  # the ~1.4 MB weights take ~6.5 s: the outage falls inside
        queued = subprocess.run([sys.executable, "manage.py", "download_model", "tiny/llama", "--quantization", "FP32", "--json"],
                                cwd=ROOT, env=subprocess_env(**env), capture_output=True, text=True, timeout=120)  # fmt: skip
        assert queued.returncode == 0, queued.stderr
        model = Model.objects.get()
        worker = start_worker(burst=False, log_file=True, **env)
        wait_for(lambda: Model.objects.get(pk=model.pk).bytes_done > 0, timeout=60, message="the download under way")
        redis.stop()
        outage_started = time.monotonic()
        time.sleep(3)  # three heartbeats due (one a second): before the fix the worker left at the first
        assert worker.poll() is None, "the worker exited during the outage:\n" + open(worker.log_path).read()[-3000:]
        running = Model.objects.get(pk=model.pk)
        assert running.status == ModelStatus.DOWNLOADING, (running.status, running.error_message)
        redis.start()
        print(f"Redis was down {time.monotonic() - outage_started:.1f} s")
        wait_for(lambda: not Model.objects.get(pk=model.pk).is_running, timeout=90, message="the end")
        done = Model.objects.get(pk=model.pk)
        assert done.status == ModelStatus.READY, (done.status, done.error_message)
        assert (done.raw_dir / "model.safetensors").read_bytes() == (tiny_repo_folder / "model.safetensors").read_bytes()
        assert worker.poll() is None
        log = open(worker.log_path).read()
        assert "heartbeat skipped" in log and "hf_" not in log
    finally:
        if worker is not None:
            stop(worker)
        redis.stop()


async def test_a_socket_opened_while_redis_is_down_is_closed_with_try_again_later(settings, user):
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
                                           "CONFIG": {"hosts": [{"address": dead}], "prefix": "outage"}}}  # fmt: skip
    cookie = await database_sync_to_async(session_cookie)(user)
    page = socket("/ws/models/", cookie)
    connected, _ = await page.connect(timeout=10)
    assert connected  # accepted only to be closed with a code: a refused handshake would be HTTP 403 or 500
    closed = await page.receive_output(timeout=10)
    assert closed == {"type": "websocket.close", "code": 1013}
