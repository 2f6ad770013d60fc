"""The Hub client every download shares (models and datasets): byte-accurate progress,
retries with backoff, a disk check, and errors a user can act on. Django-free.

Tokens are passed explicitly: `token=False` when the user gave none, so a worker's own
HF_TOKEN or cached login is never sent on their behalf.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .errors import JobCancelled, JobError

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


def ensure_free_space(folder: Path, needed_bytes: int, reserve_bytes: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed_bytes + reserve_bytes > free:
        raise JobError(
            "insufficient_disk_space",
            f"Not enough disk space: the download needs {format_bytes(needed_bytes)} (plus "
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


def _progress_class(counter: _ByteCounter, bar: str = "huggingface_hub.snapshot_download"):
    from huggingface_hub.utils import tqdm as hf_tqdm

    class BytesWritten(hf_tqdm):
        """The client's "bytes written" bar (snapshot_download's, or one http_get's) feeds
        our counter; nothing is drawn."""

        def __init__(self, *args, **kwargs):
            self.counts_bytes = kwargs.get("name") == bar
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            if self.counts_bytes and n:
                counter.add(int(n))
            return super().update(n)

    return BytesWritten


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
    repo_type: str = "model",
    revision_asked: str | None = None,
    retries: int = 3,
    backoff_seconds: float = 2.0,
) -> None:
    """snapshot_download of `files` at commit `sha` into `dest`, reporting bytes on disk.

    Retries resume from the partial files huggingface_hub keeps. `on_bytes(done, total)` is
    called from download threads; raising JobCancelled there stops the download."""
    from huggingface_hub import snapshot_download

    _configure_hub()
    total = sum(file_sizes[f] for f in files)

    def already_complete() -> int:
        return sum(file_sizes[f] for f in files if (dest / f).is_file())

    def fetch() -> None:
        counter = _ByteCounter(already_complete(), total, on_bytes)
        on_bytes(counter.done, counter.total)
        snapshot_download(
            repo_id,
            repo_type=repo_type,
            revision=sha,
            local_dir=dest,
            allow_patterns=list(files),
            endpoint=endpoint,
            token=token or False,
            tqdm_class=_progress_class(counter),
            max_workers=4,
        )

    def fetch_resuming() -> None:
        resume_partials(repo_id, sha, files, dest, token, endpoint, repo_type, on_bytes, already_complete(), total)
        fetch()

    revision = revision_asked or sha
    with_retries(fetch_resuming, retries, backoff_seconds, lambda e: translate_error(e, repo_id, revision, bool(token)))
    missing = [f for f in files if not (dest / f).is_file()]
    if missing:
        raise JobError("network_error", f"The download ended without {', '.join(missing)}; retry.", retryable=True)
    on_bytes(total, total)
    shutil.rmtree(dest / ".cache", ignore_errors=True)


def resume_partials(repo_id: str, sha: str, files: tuple[str, ...], dest: Path, token: str | None, endpoint: str,
                    repo_type: str, on_bytes: ByteCallback, done: int, total: int) -> None:  # fmt: skip
    """Finish the files an earlier attempt (a dead worker, a dropped connection) left half
    written, from their last byte, with an HTTP Range request through the Hub client's own
    `http_get`; snapshot_download then takes them as downloaded. huggingface_hub >= 2 writes
    each attempt to a fresh temporary file and never resumes across processes itself."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub._local_folder import get_local_download_paths, write_download_metadata
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    partials = {}
    for name in files:
        paths = get_local_download_paths(dest, name)
        # The client names a partial "{key}.{etag}.{attempt}.incomplete", `key` from the file name.
        key = paths.incomplete_path("ETAG").name.split(".ETAG.")[0]
        leftovers = sorted(paths.metadata_path.parent.glob(f"{key}.*.incomplete"), key=lambda p: p.stat().st_size)
        for stale in leftovers[:-1]:
            stale.unlink()
        if leftovers and not paths.file_path.is_file() and leftovers[-1].stat().st_size > 0:
            partials[name] = (paths, leftovers[-1])
    if not partials:
        return
    counter = _ByteCounter(done + sum(p.stat().st_size for _, p in partials.values()), total, on_bytes)
    for name, (paths, partial) in partials.items():
        url = hf_hub_url(repo_id, name, repo_type=repo_type, revision=sha, endpoint=endpoint)
        metadata = get_hf_file_metadata(url, token=token or False, endpoint=endpoint)
        have = partial.stat().st_size
        if metadata.size is None or have > metadata.size or metadata.etag is None:
            partial.unlink()  # not a prefix of this file: fetched afresh by snapshot_download
            continue
        if have < metadata.size:
            with partial.open("ab") as out:
                http_get(metadata.location, out, resume_size=have, headers=build_hf_headers(token=token or False),
                         expected_size=metadata.size, tqdm_class=_progress_class(counter, "huggingface_hub.http_get"))  # fmt: skip
        os.replace(partial, paths.file_path)
        write_download_metadata(dest, name, commit_hash=sha, etag=metadata.etag)
