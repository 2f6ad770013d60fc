"""The Hub client every download shares (models and datasets): byte-accurate progress,
retries with backoff, a disk check, and errors a user can act on. Django-free.

Tokens are passed explicitly: `token=False` when the user gave none, so a worker's own
HF_TOKEN or cached login is never sent on their behalf.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import JobCancelled, JobError

log = logging.getLogger(__name__)

# Our own progress reporting replaces huggingface_hub's; xet needs a CAS service the
# loopback test server does not speak and adds nothing for files this size.
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

ByteCallback = Callable[[int, int], None]
# huggingface_hub writes (and reports) in 10 MiB chunks; 256 KiB keeps the progress bar and
# cancellation responsive without costing throughput.
PROGRESS_CHUNK_BYTES = 256 << 10


def _configure_hub() -> None:
    from huggingface_hub import constants

    constants.DOWNLOAD_CHUNK_SIZE = PROGRESS_CHUNK_BYTES


def translate_error(exc: BaseException, repo_id: str, revision: str, token_given: bool) -> JobError:
    """A huggingface_hub / network / OS error as a JobError with a message a user can act on.
    Never includes the token or the request headers."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, JobError):
        return exc
    if isinstance(exc, GatedRepoError):
        if token_given:
            return JobError(
                "gated_access_denied",
                f"{repo_id} is gated and this access token has not been granted access. "
                "Request access on the model's Hub page, then retry with a token of that account.",
            )
        return JobError(
            "gated_token_required",
            f"{repo_id} is gated: add an access token from an account that has been granted access.",
        )
    if isinstance(exc, RevisionNotFoundError):
        return JobError("revision_not_found", f"Revision {revision!r} was not found in {repo_id}.")
    if isinstance(exc, RepositoryNotFoundError):
        hint = "" if token_given else " If it is private, add an access token."
        return JobError("repo_not_found", f"Repository {repo_id} was not found on the Hub.{hint}")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return JobError("disk_full", "The disk filled up during the download; free some space and retry.")
    network = (httpx2.TransportError, LocalEntryNotFoundError, ConnectionError, TimeoutError)
    if isinstance(exc, network):
        return JobError("network_error", "Could not reach the Hub (network failure); retry later.", retryable=True)
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else 0
        if status == 401 and token_given:
            return JobError("invalid_token", "The Hub rejected the access token: it is invalid or has expired.")
        if status >= 500 or status == 429:
            return JobError("network_error", f"The Hub answered HTTP {status}; retry later.", retryable=True)
        return JobError("hub_error", f"The Hub refused the request (HTTP {status}).")
    return JobError("internal_error", f"Download failed: {type(exc).__name__}.")


def with_retries(action: Callable[[], object], retries: int, backoff_seconds: float, describe: Callable) -> object:
    """Run `action`, retrying retryable failures with exponential backoff."""
    attempt = 0
    while True:
        try:
            return action()
        except (JobCancelled, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001 - translated below, re-raised as JobError
            error = describe(exc)
            attempt += 1
            if not error.retryable or attempt >= retries:
                raise error from None
            time.sleep(backoff_seconds * 2 ** (attempt - 1))


def ensure_free_space(folder: Path, needed_bytes: int, reserve_bytes: int, what: str = "the download") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed_bytes + reserve_bytes > free:
        raise JobError(
            "insufficient_disk_space",
            f"Not enough disk space: {what} needs {format_bytes(needed_bytes)} (plus "
            f"{format_bytes(reserve_bytes)} kept free) but only {format_bytes(free)} is available in the data dir.",
        )


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


class _ByteCounter:
    """Sums the bytes huggingface_hub writes, across its download threads."""

    def __init__(self, start: int, total: int, on_bytes: ByteCallback) -> None:
        self.done = start
        self.total = total
        self.on_bytes = on_bytes
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.done = min(self.total, max(0, self.done + n))
            done = self.done
        self.on_bytes(done, self.total)  # may raise JobCancelled, which stops this file's download


def _progress_class(counter: _ByteCounter, bar: str = "huggingface_hub.http_get"):
    from huggingface_hub.utils import tqdm as hf_tqdm

    class BytesWritten(hf_tqdm):
        """The client's "bytes written" bar (one http_get's) feeds our counter; nothing is
        drawn."""

        def __init__(self, *args, **kwargs):
            self.counts_bytes = kwargs.get("name") == bar
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            if self.counts_bytes and n:
                counter.add(int(n))
            return super().update(n)

    return BytesWritten


@dataclass(frozen=True)
class Digest:
    """What the Hub says a file's bytes hash to: the SHA-256 of its `lfs` entry (weights,
    large files), or the git blob id (a SHA-1 of "blob SIZE\\0" and the bytes) of a file kept
    in git itself (config.json, the tokenizer)."""

    kind: str  # "sha256" or "git-sha1"
    hexdigest: str

    def hasher(self, size: int):
        if self.kind == "git-sha1":
            hasher = hashlib.sha1(usedforsecurity=False)
            hasher.update(b"blob %d\0" % size)
            return hasher
        return hashlib.sha256()


def digests_of(siblings) -> dict[str, Digest]:
    """Each listed file's Digest, from `model_info`/`dataset_info(files_metadata=True)`'s
    siblings (the same `lfs` entry the tree listing has)."""
    found = {}
    for sibling in siblings or []:
        lfs = getattr(sibling, "lfs", None)
        sha256 = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
        if sha256:
            found[sibling.rfilename] = Digest("sha256", str(sha256).lower())
        elif getattr(sibling, "blob_id", None):
            found[sibling.rfilename] = Digest("git-sha1", str(sibling.blob_id).lower())
    return found


SUMS_FILE = "SHA256SUMS"  # in a snapshot: `sha256sum -c SHA256SUMS` re-checks it by hand


def _hashers(digest: Digest | None, size: int) -> list:
    """SHA-256 (what SHA256SUMS keeps) first, and the Hub's own kind when it is another (the
    last one is what `digest` is compared with)."""
    return [hashlib.sha256()] + ([digest.hasher(size)] if digest and digest.kind != "sha256" else [])


def _feed(path: Path, hashers: list) -> None:
    """A file's bytes, as they are on disk, into every hasher."""
    with path.open("rb") as reader:
        while chunk := reader.read(8 << 20):
            for hasher in hashers:
                hasher.update(chunk)


class _Stop(Exception):
    """Another file's download failed: this one stops too."""


class _HashingWriter:
    """The file one download writes to, hashing each chunk as it is written, so a file is
    checked as it arrives, with no second read. The Hub client's `http_get` writes through it
    (and seeks back and truncates when a server ignores a Range request: the hash restarts)."""

    def __init__(self, file, make_hashers: Callable[[], list], hashers: list, counter: "_ByteCounter",
                 stop: threading.Event) -> None:  # fmt: skip
        self.file, self.make_hashers, self.hashers, self.counter, self.stop = file, make_hashers, hashers, counter, stop

    def write(self, data: bytes) -> int:
        if self.stop.is_set():
            raise _Stop()
        for hasher in self.hashers:
            hasher.update(data)
        return self.file.write(data)

    def tell(self) -> int:
        return self.file.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.file.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        if (self.file.tell() if size is None else size) != 0:  # http_get only drops what it asked to resume from
            raise OSError("a partial download can only restart from its first byte")
        self.counter.add(-self.file.seek(0, os.SEEK_END))
        self.file.seek(0)
        self.hashers[:] = self.make_hashers()
        return self.file.truncate(0)

    def flush(self) -> None:
        self.file.flush()


def _fetch_checked(name: str, url: str, size: int, digest: Digest | None, dest: Path, headers: dict,
                   counter: "_ByteCounter", stop: threading.Event) -> str:  # fmt: skip
    """One file into `dest`, hashed as it arrives and moved into place only when its hash is
    the Hub's; one that arrives damaged is fetched again once, then the download fails. A
    partial file an earlier attempt left (`NAME.incomplete`) is resumed with an HTTP Range
    request. Returns the file's SHA-256."""
    from huggingface_hub.file_download import http_get

    final, partial = dest / name, dest / f"{name}.incomplete"
    partial.parent.mkdir(parents=True, exist_ok=True)

    def make_hashers() -> list:
        return _hashers(digest, size)

    for attempt in (1, 2):
        hashers = make_hashers()
        have = partial.stat().st_size if partial.exists() else 0
        if have > size:  # not a prefix of this file
            counter.add(-have)
            partial.unlink()
            have = 0
        with partial.open("ab") as out:
            if have:  # what an earlier attempt wrote: hashed once here, then only the rest arrives
                _feed(partial, hashers)
            if have < size:
                http_get(url, _HashingWriter(out, make_hashers, hashers, counter, stop), resume_size=have, headers=headers,
                         expected_size=size, tqdm_class=_progress_class(counter))  # fmt: skip
        sha256 = hashers[0].hexdigest()
        got = hashers[-1].hexdigest()
        if digest is None or got == digest.hexdigest:
            os.replace(partial, final)
            return sha256
        partial.unlink()
        counter.add(-size)  # those bytes are fetched again: the bar goes back
        log.warning("%s arrived with %s %s, not the Hub's %s (attempt %d of 2)", name, digest.kind, got, digest.hexdigest, attempt)
    raise JobError(
        "checksum_mismatch",
        f"{name} arrived damaged twice: its {digest.kind.upper()} was {got[:16]}…, the Hub lists {digest.hexdigest[:16]}…. "
        "Nothing was kept; retry later, and if it repeats, a proxy or the disk between here and the Hub is changing bytes.",
        retryable=False,
    )


def download_repo_files(
    repo_id: str,
    sha: str,
    files: tuple[str, ...],
    file_sizes: dict[str, int],
    dest: Path,
    token: str | None,
    endpoint: str,
    on_bytes: ByteCallback,
    *,
    digests: dict[str, Digest] | None = None,
    repo_type: str = "model",
    revision_asked: str | None = None,
    retries: int = 3,
    backoff_seconds: float = 2.0,
) -> dict[str, str]:
    """`files` at commit `sha` into `dest`, four at a time, through the Hub client's own
    `http_get` (its redirects, headers, in-call retries and Range resume), each checked
    against `digests` as it arrives. Files already in `dest` were checked when they were
    put there and are kept; partial ones are resumed. `on_bytes(done, total)` is called
    from download threads; raising JobCancelled there stops the download.

    Writes SHA256SUMS (every file's SHA-256) beside them and returns the same mapping."""
    from concurrent.futures import ThreadPoolExecutor

    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    _configure_hub()
    digests = digests or {}
    total = sum(file_sizes[f] for f in files)
    headers = build_hf_headers(token=token or False)
    known = read_sums(dest)

    def fetch() -> dict[str, str]:
        have = sum(file_sizes[f] for f in files if (dest / f).is_file())
        have += sum((dest / f"{f}.incomplete").stat().st_size for f in files
                    if not (dest / f).is_file() and (dest / f"{f}.incomplete").is_file())  # fmt: skip
        counter = _ByteCounter(have, total, on_bytes)
        on_bytes(counter.done, counter.total)
        stop = threading.Event()
        todo = [f for f in files if not (dest / f).is_file() or f not in known]

        def one(name: str) -> tuple[str, str]:
            if (dest / name).is_file():  # put there some other way (before SHA256SUMS): checked now
                digest = digests.get(name)
                hashers = _hashers(digest, file_sizes[name])
                _feed(dest / name, hashers)
                if digest is None or hashers[-1].hexdigest() == digest.hexdigest:
                    return name, hashers[0].hexdigest()
                (dest / name).unlink()
                counter.add(-file_sizes[name])
            url = hf_hub_url(repo_id, name, repo_type=repo_type, revision=sha, endpoint=endpoint)
            try:
                return name, _fetch_checked(name, url, file_sizes[name], digests.get(name), dest, headers, counter, stop)
            except BaseException:
                stop.set()
                raise

        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="hub-download") as pool:
            futures = [pool.submit(one, name) for name in todo]
            results, first_error = {}, None
            for future in futures:
                try:
                    name, digest = future.result()
                    results[name] = digest
                except _Stop:
                    pass
                except BaseException as exc:  # noqa: BLE001 - the first real failure is raised below
                    first_error = first_error or exc
        if first_error is not None:
            raise first_error
        return results

    revision = revision_asked or sha
    sums = {**known, **with_retries(fetch, retries, backoff_seconds, lambda e: translate_error(e, repo_id, revision, bool(token)))}
    missing = [f for f in files if not (dest / f).is_file()]
    if missing:
        raise JobError("network_error", f"The download ended without {', '.join(missing)}; retry.", retryable=True)
    on_bytes(total, total)
    write_sums(dest, {name: sums[name] for name in sorted(sums) if name in files or (dest / name).is_file()})
    shutil.rmtree(dest / ".cache", ignore_errors=True)
    return sums


def read_sums(folder: Path) -> dict[str, str]:
    """A folder's SHA256SUMS as {file: sha256} (empty when it has none)."""
    try:
        lines = (folder / SUMS_FILE).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    sums = {}
    for line in lines:
        digest, _, name = line.partition("  ")
        if len(digest) == 64 and name:
            sums[name] = digest
    return sums


def write_sums(folder: Path, sums: dict[str, str]) -> None:
    """SHA256SUMS in `sha256sum`'s own format, written aside and moved into place."""
    tmp = folder / f".{SUMS_FILE}.tmp"
    tmp.write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
    os.replace(tmp, folder / SUMS_FILE)


def verify_folder(folder: Path) -> tuple[list[str], list[str]]:
    """Re-hash every file SHA256SUMS names: (the files that match, the problems found: a
    changed or missing file, named)."""
    good, problems = [], []
    for name, expected in read_sums(folder).items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        hasher = hashlib.sha256()
        _feed(path, [hasher])
        if hasher.hexdigest() == expected:
            good.append(name)
        else:
            problems.append(f"{name} has changed since it was downloaded (SHA-256 {hasher.hexdigest()[:16]}…, "
                            f"expected {expected[:16]}…)")  # fmt: skip
    return good, problems
