"""A process that has imported torch and transformers once, and forks the suite's worker,
server and command subprocesses from there instead of starting each from nothing.

Every RQ worker the suite starts used to pay about 6 s of CPU importing torch and
transformers' modelling code before its first job (its work horses fork from it with them
loaded); the suite starts about forty. Here that is paid once per pytest process: the
child of a fork runs `manage.py …` or `-m module …` exactly as `python` would (same argv,
environment, working directory and standard streams), with Django set up from nothing in
the child, since settings differ from test to test.

Only what reads no per-test environment at import is loaded ahead (no Django settings, no
daphne: its import creates an event loop, no pyarrow: its allocator starts a thread, and a
fork must happen while this process has one thread). A spawn whose environment differs
from this process's in anything but the keys the app reads at set-up (`SAFE_TO_DIFFER`)
starts a plain subprocess instead: those keys could have been read at import.

Server: `python -m models_app.tests.zygote SOCKET`. Client: `Zygote.spawn`, which returns
an object with the part of `subprocess.Popen` the tests use (pid, poll, wait, terminate,
kill, send_signal, communicate, returncode, stdout, stderr).
"""

from __future__ import annotations

import io
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time

PRELOAD = (
    "torch",
    "transformers",
    "transformers.modeling_utils",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "transformers.models.llama.modeling_llama",
    "numpy",
    "safetensors.torch",
    "redis",
    "rq",
    "rq.queue",
    "rq.worker",
    "psycopg",
    # Django's own modules that read no setting at import (django.setup() runs in the child).
    "django.urls",
    "django.http",
    "django.db.models",
    "django.core.serializers.json",
    "django.db.backends.postgresql.psycopg_any",
    "twisted.internet.posixbase",  # daphne's (not the reactor: daphne installs its own)
    "twisted.internet.tcp",
)
# Then, as an RQ worker does before its first work horse: the extraction's compiled statistics
# (numba's import and its on-disk cache of the compiled pass, about 1 s).
WARM_UPS = ("activations_app.ml.stats:warm",)
# Read by the app's settings (or passed explicitly, like the Hub endpoint), never by a
# preloaded library at import.
SAFE_TO_DIFFER = ("MISTUDIO_", "DJANGO_SETTINGS_MODULE", "DATABASE_URL", "REDIS_URL", "PYTHONUNBUFFERED", "HF_ENDPOINT",
                  "PYTEST_")  # fmt: skip
_HEADER = struct.Struct("!I")
CHILD_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}


# ---------------------------------------------------------------------------- server side


def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
    while len(data) < _HEADER.size:
        data += conn.recv(1 << 16)
    (length,) = _HEADER.unpack_from(data)
    body = data[_HEADER.size :]
    while len(body) < length:
        chunk = conn.recv(1 << 16)
        if not chunk:
            raise EOFError("the request ended early")
        body += chunk
    return json.loads(body), list(fds)


def _run_child(request: dict, fds: list[int], close: list[socket.socket]) -> None:
    """In the forked child: become `python ARGV…` and exit with its status."""
    code = 1
    try:
        for sock in close:
            sock.close()
        for sig in CHILD_SIGNALS:
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, CHILD_SIGNALS)
        from mistudio.supervise import die_with_parent

        die_with_parent()  # the suite's zygote goes, its children go
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for name in ("stdout", "stderr"):
            stream = io.TextIOWrapper(io.FileIO(1 if name == "stdout" else 2, "w", closefd=False),
                                      encoding="utf-8", errors="backslashreplace", line_buffering=True,
                                      write_through=request["env"].get("PYTHONUNBUFFERED") == "1")  # fmt: skip
            setattr(sys, name, stream)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        # Fresh seeds, as a new interpreter would have (a fork copies the generators' state).
        import numpy
        import torch

        numpy.random.seed()
        torch.seed()
        import runpy

        argv = request["argv"]
        cwd = request["cwd"]
        sys.path[0] = cwd
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        else:
            sys.argv = list(argv)
            runpy.run_path(os.path.join(cwd, argv[0]), run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001 (a child reports everything, as python would)
        import traceback

        traceback.print_exc()
        code = 1
    # What a normal interpreter does on its way out (non-daemon threads, exit handlers), as
    # manage.py itself leaves.
    from mistudio.supervise import exit_now

    exit_now(code)


def serve(path: str) -> None:
    import importlib

    parent = os.getppid()  # polled, not PR_SET_PDEATHSIG: that fires when the starting *thread* ends
    for name in PRELOAD:
        importlib.import_module(name)
    for target in WARM_UPS:
        module, _, function = target.partition(":")
        getattr(importlib.import_module(module), function)()
    import threading

    # No Python thread may run at a fork (BLAS's own pool, without OMP_NUM_THREADS=1, has
    # fork handlers: the RQ worker forks its work horses in the same state).
    assert threading.active_count() == 1, "the zygote must have no other Python thread when it forks"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    children: dict[int, socket.socket] = {}
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    print("ready", flush=True)
    while not stopping and os.getppid() == parent:
        try:
            readable, _, _ = select.select([listener], [], [], 0.05)
        except InterruptedError:
            readable = []
        if readable:
            conn, _ = listener.accept()
            try:
                request, fds = _recv_request(conn)
            except (OSError, EOFError, ValueError):
                conn.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            # A signal sent to the child before it drops this process's handlers waits
            # until it has (then acts as on a fresh python).
            signal.pthread_sigmask(signal.SIG_BLOCK, CHILD_SIGNALS)
            pid = os.fork()
            if pid == 0:
                _run_child(request, fds, [listener, conn, *children.values()])
            signal.pthread_sigmask(signal.SIG_UNBLOCK, CHILD_SIGNALS)
            for fd in fds:
                os.close(fd)
            children[pid] = conn
            try:
                conn.sendall(f"{pid}\n".encode())
            except OSError:
                pass
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:
                    pass
                conn.close()
    for pid in list(children):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    listener.close()


# ---------------------------------------------------------------------------- client side


class ForkedProcess:
    """The part of `subprocess.Popen` the suite uses, for a child of the zygote. Its exit
    status comes over the socket: the zygote, its parent, reaps it."""

    def __init__(self, args: list[str], conn: socket.socket, stdout, stderr):
        self.args = args
        self._conn = conn
        self._buffer = b""
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None
        self._output: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.pid = int(self._line(None))

    def _line(self, timeout: float | None) -> str | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([self._conn], [], [], left)
            if not readable:
                return None
            chunk = self._conn.recv(4096)
            if not chunk:  # the zygote went away: its children went with it
                self._buffer += b"-9\n"
                break
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def poll(self) -> int | None:
        if self.returncode is None:
            line = self._line(0)
            if line is not None:
                self.returncode = int(line)
                self._conn.close()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            line = self._line(timeout)
            if line is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = int(line)
            self._conn.close()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, input=None, timeout: float | None = None):
        """Reads the piped streams to their end, then waits; like Popen's, a timeout keeps
        what was read for the next call."""
        assert input is None, "the suite writes nothing to a child's stdin"
        deadline = None if timeout is None else time.monotonic() + timeout
        streams = {name: stream for name in ("stdout", "stderr") if (stream := getattr(self, name)) is not None}
        open_streams = {stream.fileno(): (name, stream) for name, stream in streams.items() if not stream.closed}
        while open_streams:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            readable, _, _ = select.select(list(open_streams), [], [], left)
            for fd in readable:
                name, stream = open_streams[fd]
                data = os.read(fd, 1 << 16)
                if data:
                    self._output[name].append(data)
                else:
                    stream.close()
                    del open_streams[fd]
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return tuple(
            b"".join(self._output[name]).decode("utf-8", "replace") if name in streams else None
            for name in ("stdout", "stderr")
        )


class Zygote:
    """One zygote per pytest process, started on first use and stopped at its exit."""

    def __init__(self, root: str):
        import tempfile

        self.root = root
        self.folder = tempfile.mkdtemp(prefix="zygote-")
        self.path = os.path.join(self.folder, "socket")
        self.env = dict(os.environ)
        self.process = subprocess.Popen([sys.executable, "-m", "models_app.tests.zygote", self.path], cwd=root,
                                        stdout=subprocess.PIPE, env=self.env)  # fmt: skip
        ready = self.process.stdout.readline()
        assert ready == b"ready\n", f"the zygote did not start: {ready!r}"
        self.forked = 0
        self.plain = 0

    def serves(self, env: dict[str, str]) -> bool:
        """Whether a fork of this process sees what a fresh `python` with `env` would."""
        if self.process.poll() is not None:
            return False
        keys = set(env) | set(self.env)
        return all(env.get(key) == self.env.get(key) or key.startswith(SAFE_TO_DIFFER) for key in keys)

    def spawn(self, args: list[str], cwd, env: dict[str, str], stdout=None, stderr=None) -> ForkedProcess:
        """Like `subprocess.Popen([sys.executable, *args], cwd, env, stdout, stderr, text=True)`
        with stdout/stderr each None, subprocess.PIPE, subprocess.STDOUT or a file."""
        ends, keep = [], []

        def stream(target, fallback_fd):
            if target is None:
                return fallback_fd, None
            if target == subprocess.PIPE:
                read, write = os.pipe()
                ends.append(write)
                return write, os.fdopen(read, "r", encoding="utf-8", errors="replace")
            fd = target if isinstance(target, int) else target.fileno()
            return fd, None

        devnull = os.open(os.devnull, os.O_RDONLY)
        ends.append(devnull)
        out_fd, out_reader = stream(stdout, 1)
        err_fd, err_reader = (out_fd, None) if stderr == subprocess.STDOUT else stream(stderr, 2)
        keep = [devnull, out_fd, err_fd]
        body = json.dumps({"argv": list(args), "cwd": str(cwd), "env": env}).encode()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self.path)
            socket.send_fds(conn, [_HEADER.pack(len(body)) + body], keep)
        finally:
            for fd in ends:
                os.close(fd)
        self.forked += 1
        return ForkedProcess([sys.executable, *args], conn, out_reader, err_reader)

    def stop(self) -> None:
        import shutil

        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


if __name__ == "__main__":
    serve(sys.argv[1])
