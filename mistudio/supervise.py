"""What `scripts/run` runs after migrating: the web server and the workers (and, where no
Redis answers and none was configured, a private Redis), each restarted within seconds
when it dies, so a killed worker never takes the web server down, nor the reverse.

The web server is MISTUDIO_WEB_PROCESSES daphne processes (default: one per CPU, at most
4) adopting one listening socket that this process binds and holds, so the kernel spreads
connections over them, and one that dies or restarts never closes the port: a daphne runs
Django's sync code under one GIL, and one process saturated at ~95 requests/s on this
2-core machine (scripts/bench). WebSocket groups span processes (Redis pub/sub layer).

Plain Python, no Django: it only starts processes, and each child loads the settings
itself with the environment given here (REDIS_URL for a private Redis)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_REDIS = ("127.0.0.1", 6379)
STOP_GRACE_SECONDS = 10  # a running job gets this long to stop before it is killed


def answers_ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """This process must not outlive its parent (a kill -9 of it): Linux sends it SIGKILL
    when the parent dies. An RQ work horse calls it (its worker's death is then seen by the
    registry check), and so does a test subprocess forked from the suite's zygote."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: nothing to ask for
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def exit_now(code) -> None:
    """Leave as an interpreter does (wait for non-daemon threads, run the exit handlers,
    flush stdout and stderr) but without tearing every module down: with torch and
    transformers loaded that teardown takes about a second here (1.13 s after a SmolLM2
    extraction), longer than a short command's own work. `code` as SystemExit takes it."""
    import atexit
    import threading

    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for step in (threading._shutdown, atexit._run_exitfuncs):
        try:
            step()
        except BaseException:  # noqa: BLE001 - on the way out, as the interpreter would
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code or 0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Child:
    name: str
    command: list[str]
    process: subprocess.Popen | None = None
    started: float = 0.0
    quick_deaths: int = field(default=0)

    pass_fds: tuple[int, ...] = ()

    def start(self, env: dict) -> None:
        self.process = subprocess.Popen(self.command, env=env, pass_fds=self.pass_fds)
        self.started = time.monotonic()

    def restart_delay(self) -> float:
        """Back off when it keeps dying at once (a bad setting), never past 8 s."""
        if time.monotonic() - self.started < 5:
            self.quick_deaths += 1
        else:
            self.quick_deaths = 0
        return min(8.0, 0.5 * 2 ** max(0, self.quick_deaths - 1)) if self.quick_deaths else 0.5


def web_processes() -> int:
    return max(1, int(os.environ.get("MISTUDIO_WEB_PROCESSES") or min(4, os.cpu_count() or 1)))


def listen(host: str, port: int) -> socket.socket:
    """The web server's socket, bound here once for every daphne to adopt."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"Cannot listen on {host}:{port}: {exc.strerror}. Set MISTUDIO_PORT to a free port.") from None
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


class Supervisor:
    def __init__(self, host: str, port: int, workers: int, data_dir: Path, web: int | None = None) -> None:
        self.env = dict(os.environ)
        self.children: list[Child] = []
        self.stopping = False
        self.socket: socket.socket | None = None
        python = sys.executable
        redis = self._redis(data_dir)
        if redis is not None:
            self.children.append(redis)
        web = web_processes() if web is None else web
        self.env.setdefault("MISTUDIO_WEB_PROCESSES", str(web))  # the pool's size per process follows it (settings)
        if web:
            self.socket = listen(host, port)
            fd = self.socket.fileno()
            for n in range(1, web + 1):
                command = [python, "-m", "mistudio.webserver", "--fd", str(fd), "mistudio.asgi:application"]
                self.children.append(Child(f"web {n}", command, pass_fds=(fd,)))
        for n in range(1, workers + 1):
            name = f"mistudio-{socket.gethostname()}-{port}-{n}"
            self.children.append(Child(f"worker {n}", [python, "manage.py", "rqworker", "default", "--name", name,
                                                       "--worker-class", "mistudio.worker.MistudioWorker"]))  # fmt: skip

    def _redis(self, data_dir: Path) -> Child | None:
        """An explicit REDIS_URL is used as it is; else the default Redis if it answers;
        else a private redis-server of our own, its data kept in the data dir."""
        if self.env.get("REDIS_URL") or answers_ping(*DEFAULT_REDIS):
            return None
        server = shutil.which("redis-server")
        if server is None:
            raise SystemExit("No Redis answers at 127.0.0.1:6379 and redis-server is not installed: install it "
                             "(apt-get install redis-server) or set REDIS_URL.")  # fmt: skip
        port = free_port()
        folder = data_dir / "redis"
        folder.mkdir(parents=True, exist_ok=True)
        self.env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        print(f"No Redis at 127.0.0.1:6379: running a private one on port {port} (data in {folder})", flush=True)
        return Child("redis", [server, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(folder),
                               "--appendonly", "yes", "--save", "60 1"])  # fmt: skip

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._request_stop)
        signal.signal(signal.SIGTERM, self._request_stop)
        for child in self.children:
            child.start(self.env)
            if child.name == "redis":
                self._wait_for_redis()
        while not self.stopping:
            for child in self.children:
                code = child.process.poll()
                if code is not None and not self.stopping:
                    delay = child.restart_delay()
                    print(f"{child.name} exited ({_describe(code)}); restarting in {delay:.1f} s", flush=True)
                    time.sleep(delay)
                    if not self.stopping:
                        child.start(self.env)
            time.sleep(0.2)
        self._stop_all()
        return 0

    def _wait_for_redis(self) -> None:
        port = int(self.env["REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not answers_ping("127.0.0.1", port):
            time.sleep(0.1)

    def _request_stop(self, signum, frame) -> None:
        self.stopping = True

    def _stop_all(self) -> None:
        """Web and workers first (a worker finishes or abandons its job), Redis last."""
        ordered = [c for c in self.children if c.name != "redis"] + [c for c in self.children if c.name == "redis"]
        for child in ordered:
            if child.process and child.process.poll() is None:
                child.process.terminate()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for child in ordered:
            if child.process is None:
                continue
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()  # its work horse dies with it (MistudioWorker)
                child.process.wait()
        if self.socket is not None:
            self.socket.close()


def _describe(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"exit status {code}"


def main(argv: list[str]) -> int:
    host = os.environ.get("MISTUDIO_HOST", "127.0.0.1")
    port = int(os.environ.get("MISTUDIO_PORT", "8000"))
    workers = int(os.environ.get("MISTUDIO_WORKERS", "1"))
    data_dir = Path(os.environ.get("MISTUDIO_DATA_DIR", Path(__file__).resolve().parent.parent / "data")).resolve()
    return Supervisor(host, port, workers, data_dir).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
