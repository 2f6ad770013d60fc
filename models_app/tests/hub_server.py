"""Loopback stand-in for the Hugging Face Hub HTTP API, for tests that must not touch the internet.

Speaks enough of the Hub protocol for the real ``huggingface_hub`` (2.4.0) client to run ``HfApi.model_info``,
``HfApi.list_repo_tree``, ``hf_hub_download`` and ``snapshot_download`` against ``HubServer.endpoint``.
Set ``HF_HUB_DISABLE_XET=1`` and ``HF_HUB_DISABLE_TELEMETRY=1`` before importing huggingface_hub.

What the client raises for each answer (``hf_raise_for_status`` in ``huggingface_hub.utils._http``):

- unknown token -> 401, no X-Error-Code -> plain ``HfHubHTTPError`` (status 401), on every endpoint.
- gated repo file, anonymous (401) or token without access (403) -> ``GatedRepoError``.
- unknown repo -> 401 anonymous / 404 authenticated, ``RepoNotFound`` -> ``RepositoryNotFoundError``.
- unknown revision -> ``RevisionNotFoundError``; unknown file -> ``RemoteEntryNotFoundError``.
- ``fail_next_requests`` -> connection closed unanswered -> ``httpx2.RemoteProtocolError``.

As on the real Hub, a gated repo's metadata and file listing are public: only ``/resolve/`` is gated.
The client sends ``Range`` only when a body breaks mid-stream after >= 10 MiB (its read chunk), retrying in the same
call; a new call never resumes an earlier partial download. Only GET and HEAD are served.
"""

import contextlib
import functools
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

VALID_UNGATED_TOKEN = "hf_valid_but_not_granted"

_CHUNK = 64 * 1024
_LFS_THRESHOLD = 10 * 1024 * 1024
_LFS_SUFFIXES = (".safetensors", ".bin")
_TIMESTAMP = "2024-01-01T00:00:00.000Z"
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


def make_sha(text: str) -> str:
    """Deterministic 40-hex id, shaped like a git commit sha."""
    return hashlib.sha1(text.encode()).hexdigest()


@dataclass
class HubRepo:
    repo_id: str
    folder: Path
    sha: str
    gated: bool = False
    allowed_tokens: frozenset[str] = frozenset()
    repo_type: str = "model"  # or "dataset": served under /api/datasets/… and /datasets/…/resolve/…


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str  # raw request target, query string included
    authorization: str | None
    range: str | None
    status: int  # 0 when the connection was dropped on purpose (fail_next_requests)
    body_bytes: int = 0  # what the answer's body carried (0 for HEAD)


@dataclass(frozen=True)
class _Blob:
    path: Path
    size: int
    blob_id: str  # git blob sha1: of the content, or of the LFS pointer for LFS files
    sha256: str
    pointer_size: int | None  # None for files stored as plain git blobs

    @property
    def etag(self) -> str:
        return self.sha256 if self.pointer_size is not None else self.blob_id

    def lfs(self, sha_key: str) -> dict[str, Any] | None:
        # model_info names the digest "sha256", the tree endpoint names it "oid".
        if self.pointer_size is None:
            return None
        return {sha_key: self.sha256, "size": self.size, "pointerSize": self.pointer_size}


@functools.cache
def _hash_file(path: Path, size: int, mtime_ns: int) -> _Blob:
    """Hashes one file version; (size, mtime_ns) in the cache key makes edits between requests visible."""
    sha256 = hashlib.sha256()
    git_sha1 = hashlib.sha1(b"blob %d\0" % size)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            sha256.update(chunk)
            git_sha1.update(chunk)
    if size <= _LFS_THRESHOLD and path.suffix not in _LFS_SUFFIXES:
        return _Blob(path, size, git_sha1.hexdigest(), sha256.hexdigest(), None)
    # Git stores LFS files as a small pointer blob, so the Hub's blobId is the sha1 of that pointer.
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256.hexdigest()}\nsize {size}\n".encode()
    pointer_id = hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()
    return _Blob(path, size, pointer_id, sha256.hexdigest(), len(pointer))


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class HubServer:
    def __init__(self, bytes_per_second: int | None = None) -> None:
        self.bytes_per_second = bytes_per_second
        self.fail_next_requests = 0
        # file name -> how many of its next GETs arrive with one byte flipped (a bad proxy, a
        # flaky disk on the way): the client must notice by the file's hash.
        self.damage_next_downloads: dict[str, int] = {}
        self.requests: list[RequestRecord] = []
        self._repos: dict[tuple[str, str], HubRepo] = {}
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def add_repo(self, repo: HubRepo) -> None:
        self._repos[(repo.repo_type, repo.repo_id)] = repo

    @property
    def endpoint(self) -> str:
        assert self._httpd is not None, "HubServer.start() has not been called"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> "HubServer":
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, hub=self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None or self._thread is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        # Keep-alive and throttled connections outlive serve_forever; cut them so a stopped Hub is really gone.
        with self._lock:
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self._thread.join()
        self._httpd = self._thread = None

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self.requests.append(record)

    def _valid_tokens(self) -> set[str]:
        return {VALID_UNGATED_TOKEN}.union(*(repo.allowed_tokens for repo in self._repos.values()))

    def _files(self, repo: HubRepo) -> dict[str, _Blob]:
        files: dict[str, _Blob] = {}
        for path in sorted(path for path in repo.folder.rglob("*") if path.is_file()):
            stat = path.stat()
            files[path.relative_to(repo.folder).as_posix()] = _hash_file(path, stat.st_size, stat.st_mtime_ns)
        return files


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real Hub

    def __init__(self, *args: Any, hub: HubServer) -> None:
        self.hub = hub  # set first: the base constructor serves the whole connection
        super().__init__(*args)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def handle(self) -> None:
        with self.hub._lock:
            self.hub._connections.add(self.connection)
        try:
            super().handle()
        except ConnectionError:
            pass  # clients hanging up mid-transfer (cancelled downloads) are expected
        finally:
            with self.hub._lock:
                self.hub._connections.discard(self.connection)

    def do_GET(self) -> None:
        self._dispatch(send_body=True)

    def do_HEAD(self) -> None:
        self._dispatch(send_body=False)

    def _dispatch(self, send_body: bool) -> None:
        with self.hub._lock:
            drop = self.hub.fail_next_requests > 0
            self.hub.fail_next_requests -= drop
        if drop:
            self._log(0)
            self.close_connection = True  # hang up without a status line: looks like a network failure
            return
        try:
            self._route(send_body)
        except _HubError as err:
            code = {"X-Error-Code": err.code} if err.code else {}
            headers = {**code, "X-Error-Message": err.message, **err.headers}
            self._send_json(err.status, {"error": err.message}, send_body, headers)

    def _route(self, send_body: bool) -> None:
        url = urlsplit(self.path)
        parts = url.path.lstrip("/").split("/")
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        self._repo_type = "model"
        if parts[:2] == ["api", "datasets"] or (parts[0] == "datasets" and len(parts) >= 6):
            self._repo_type = "dataset"
            parts = ["api", "models", *parts[2:]] if parts[0] == "api" else parts[1:]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = f"{unquote(parts[2])}/{unquote(parts[3])}", parts[4:]
            if not rest:
                return self._model_info(repo_id, "main", query, send_body)
            if rest[0] == "revision" and len(rest) == 2:
                return self._model_info(repo_id, unquote(rest[1]), query, send_body)
            if rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo_id, unquote(rest[1]), unquote("/".join(rest[2:])), query, send_body)
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo_id = f"{unquote(parts[0])}/{unquote(parts[1])}"
            return self._resolve(repo_id, unquote(parts[3]), unquote("/".join(parts[4:])), send_body)
        raise _HubError(404, f"Sorry, we can't find the page you are looking for ({url.path}).")

    def _authorize(self, repo_id: str, revision: str, gated: bool) -> HubRepo:
        auth = self.headers.get("Authorization")
        token = auth.removeprefix("Bearer ") if auth is not None else None
        if token is not None and token not in self.hub._valid_tokens():
            raise _HubError(401, "Invalid credentials in Authorization header")
        repo = self.hub._repos.get((self._repo_type, repo_id))
        if repo is None:
            # Anonymous callers get 401 so private repos cannot be told apart from missing ones.
            raise _HubError(401 if token is None else 404, "Repository not found", "RepoNotFound")
        if gated and repo.gated and token is None:
            message = "is restricted. You must have access to it and be authenticated to access it. Please log in."
            raise _HubError(401, f"Access to model {repo_id} {message}", "GatedRepo")
        if gated and repo.gated and token not in repo.allowed_tokens:
            message = f"Access to model {repo_id} is restricted and you are not in the authorized list."
            raise _HubError(403, message, "GatedRepo")
        if revision not in ("main", repo.sha):
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo

    def _model_info(self, repo_id: str, revision: str, query: dict[str, str], send_body: bool) -> None:
        repo = self._authorize(repo_id, revision, gated=False)
        files = self.hub._files(repo)
        with_blobs = query.get("blobs", "").lower() in ("true", "1")  # what files_metadata=True sends
        siblings = []
        for name, blob in files.items():
            sibling: dict[str, Any] = {"rfilename": name}
            if with_blobs:
                sibling |= {"size": blob.size, "blobId": blob.blob_id}
                if (lfs := blob.lfs("sha256")) is not None:
                    sibling["lfs"] = lfs
            siblings.append(sibling)
        info = {
            "_id": make_sha(repo_id)[:24], "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
            "sha": repo.sha, "lastModified": _TIMESTAMP, "createdAt": _TIMESTAMP, "private": False,
            "disabled": False, "gated": "manual" if repo.gated else False, "downloads": 0, "likes": 0,
            "tags": [], "cardData": {}, "spaces": [], "siblings": siblings,
            "usedStorage": sum(blob.size for blob in files.values()),
        }
        self._send_json(200, info, send_body)

    def _tree(self, repo_id: str, revision: str, folder: str, query: dict[str, str], send_body: bool) -> None:
        repo = self._authorize(repo_id, revision, gated=False)
        recursive = query.get("recursive", "").lower() in ("true", "1")
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        entries: dict[str, dict[str, Any]] = {}
        for name, blob in self.hub._files(repo).items():
            if not name.startswith(prefix):
                continue
            # Parent folders below the listed one show up as "directory" entries, like git trees.
            dirs = name[len(prefix):].split("/")[:-1]
            for depth in range(1, (len(dirs) if recursive else min(len(dirs), 1)) + 1):
                path = prefix + "/".join(dirs[:depth])
                entries[path] = {"type": "directory", "oid": make_sha(f"{repo.sha}:{path}"), "size": 0, "path": path}
            if recursive or not dirs:
                lfs = blob.lfs("oid")
                entries[name] = {"type": "file", "oid": blob.blob_id, "size": blob.size, "path": name}
                entries[name] |= {"lfs": lfs} if lfs is not None else {}
        if prefix and not entries:
            raise _HubError(404, f"{folder} does not exist on {revision}", "EntryNotFound")
        self._send_json(200, [entries[path] for path in sorted(entries)], send_body)

    def _resolve(self, repo_id: str, revision: str, filename: str, send_body: bool) -> None:
        repo = self._authorize(repo_id, revision, gated=True)
        blob = self.hub._files(repo).get(filename)
        if blob is None:
            raise _HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": repo.sha})
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        headers |= {"ETag": f'"{blob.etag}"', "X-Repo-Commit": repo.sha}
        if blob.pointer_size is not None:
            headers |= {"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)}
        start, end, status = 0, blob.size - 1, 200
        match = _RANGE.fullmatch(self.headers.get("Range", "").strip())
        if match is not None:  # huggingface_hub resumes interrupted downloads with "bytes=START-"
            start, end = int(match[1]), min(int(match[2]), end) if match[2] else end
            if start > end:
                unsatisfiable = {"Content-Range": f"bytes */{blob.size}"}
                raise _HubError(416, "Requested range not satisfiable", headers=unsatisfiable)
            status, headers["Content-Range"] = 206, f"bytes {start}-{end}/{blob.size}"
        self._send_head(status, headers, end - start + 1)
        if send_body:
            with self.hub._lock:
                damaged = self.hub.damage_next_downloads.get(filename, 0) > 0
                if damaged:
                    self.hub.damage_next_downloads[filename] -= 1
            self._stream(blob.path, start, end - start + 1, flip_at=blob.size // 2 if damaged else None)

    def _stream(self, path: Path, offset: int, length: int, flip_at: int | None = None) -> None:
        with path.open("rb") as f:
            f.seek(offset)
            while length > 0:
                rate = self.hub.bytes_per_second  # re-read per chunk so a test can change it mid-transfer
                at = f.tell()
                chunk = f.read(min(length, _CHUNK if rate is None else max(1, min(_CHUNK, rate // 10))))
                if not chunk:  # file shrank under us: the promised Content-Length can no longer be honoured
                    self.close_connection = True
                    return
                if flip_at is not None and at <= flip_at < at + len(chunk):
                    chunk = chunk[: flip_at - at] + bytes([chunk[flip_at - at] ^ 0x01]) + chunk[flip_at - at + 1 :]
                self.wfile.write(chunk)
                length -= len(chunk)
                if rate is not None:
                    time.sleep(len(chunk) / rate)

    def _send_json(self, status: int, payload: object, send_body: bool, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self._send_head(status, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, len(body))
        if send_body:
            self.wfile.write(body)

    def _send_head(self, status: int, headers: dict[str, str], length: int) -> None:
        self._log(status, length if self.command == "GET" else 0)
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(length)}.items():
            self.send_header(name, value)
        self.end_headers()

    def _log(self, status: int, body_bytes: int = 0) -> None:
        authorization, range_ = self.headers["Authorization"], self.headers["Range"]
        self.hub._record(RequestRecord(self.command, self.path, authorization, range_, status, body_bytes))


def _serve_until_killed(repos: list[HubRepo], bytes_per_second: int | None, ready) -> None:
    server = HubServer(bytes_per_second)
    for repo in repos:
        server.add_repo(repo)
    server.start()
    ready.put(server.endpoint)
    threading.Event().wait()


@contextlib.contextmanager
def hub_in_subprocess(repos: list[HubRepo], bytes_per_second: int | None = None):
    """The loopback Hub in a process of its own, as a real server is: for benchmarks, where a
    server thread in the measuring process would take the GIL from the client it serves.
    Yields the endpoint."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    process = context.Process(target=_serve_until_killed, args=(list(repos), bytes_per_second, ready), daemon=True)
    process.start()
    try:
        yield ready.get(timeout=120)
    finally:
        process.terminate()
        process.join()
