"""Text datasets from Hub dataset repos, through the same client, endpoint and error
translation as model downloads (so the loopback Hub tests them too)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from mistudio import hub
from mistudio.errors import InvalidInput, JobError

from .datasets import FORMATS, check_parquet_text_column, preview_text


def split_files(paths: list[str], split: str, config: str = "") -> list[str]:
    """The repo's data files of `split`: files named after it (train.jsonl,
    data/train-00000-of-00002.parquet, train/part.csv); every data file when the repo has
    no split names at all. With a `config` (a subset), only the files in its folder."""
    data = sorted(p for p in paths if Path(p).suffix.lower() in FORMATS and not Path(p).name.startswith("."))
    if config:
        inside = [p for p in data if config in Path(p).parts[:-1]]
        if not inside:
            folders = sorted({Path(p).parts[0] for p in data if len(Path(p).parts) > 1})
            raise JobError("config_not_found", f"The dataset has no {config!r} subset; its folders: {', '.join(folders[:10]) or 'none'}.")
        data = inside
    pattern = re.compile(rf"(^|[/_\-.]){re.escape(split)}([/_\-.]|$)")
    chosen = [p for p in data if pattern.search(p)]
    if chosen:
        return chosen
    named_splits = [p for p in data if re.search(r"(^|[/_\-.])(train|test|validation|valid|dev)([/_\-.]|$)", p)]
    if named_splits:
        raise JobError("split_not_found", f"The dataset has no {split!r} split; its files: {', '.join(data[:10])}.")
    if not data:
        raise JobError("no_data_files", f"The dataset repo has no {', '.join(FORMATS)} files.")
    return data


@dataclass(frozen=True)
class DatasetPlan:
    repo_id: str
    revision: str  # what the user asked for
    sha: str  # the commit it resolved to
    files: tuple[str, ...]  # the split's data files, in order
    file_sizes: dict[str, int]
    digests: dict[str, hub.Digest] = field(default_factory=dict)  # what each file must hash to (the Hub's)

    @property
    def total_bytes(self) -> int:
        return sum(self.file_sizes[f] for f in self.files)


def plan_dataset(
    repo_id: str, revision: str, split: str, token: str | None, endpoint: str, retries: int = 3, backoff_seconds: float = 2.0,
    config: str = "",
) -> DatasetPlan:
    """The split's data files and their sizes at the commit `revision` resolves to."""
    from huggingface_hub import HfApi

    def fetch() -> DatasetPlan:
        info = HfApi(endpoint=endpoint).dataset_info(repo_id, revision=revision, files_metadata=True, token=token or False)
        sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
        return DatasetPlan(repo_id, revision, str(info.sha), tuple(split_files(list(sizes), split, config)), sizes,
                           hub.digests_of(info.siblings))

    return hub.with_retries(fetch, retries, backoff_seconds, lambda e: hub.translate_error(e, repo_id, revision, bool(token)))


def download_dataset(plan: DatasetPlan, dest: Path, token: str | None, endpoint: str, on_bytes: hub.ByteCallback,
                     retries: int = 3, backoff_seconds: float = 2.0) -> None:  # fmt: skip
    """The split's files into `dest` through the shared Hub client (progress, retries, resume)."""
    hub.download_repo_files(
        plan.repo_id, plan.sha, plan.files, plan.file_sizes, dest, token, endpoint, on_bytes, repo_type="dataset",
        digests=plan.digests,
        revision_asked=plan.revision, retries=retries, backoff_seconds=backoff_seconds,
    )  # fmt: skip


# --- streaming: read only what an extraction needs -----------------------------------------

STREAM_BLOCK_BYTES = 1 << 20  # HfFileSystem's read-ahead per Range request
PREVIEW_ROWS = 5


def _filesystem(token: str | None, endpoint: str):
    from huggingface_hub import HfFileSystem

    return HfFileSystem(endpoint=endpoint, token=token or False, skip_instance_cache=True)


def _remote(plan_repo: str, sha: str, name: str) -> str:
    return f"datasets/{plan_repo}@{sha}/{name}"


PROBE_BYTES = 64 << 10  # what the request-time check reads of a file that is not parquet


def stream_texts(repo_id: str, sha: str, files: list[str], text_column: str, token: str | None, endpoint: str,
                 block_bytes: int = STREAM_BLOCK_BYTES):  # fmt: skip
    """The split's rows, read from the Hub as they are consumed: parquet row group by row
    group (footer first), jsonl/csv/txt in HTTP Range blocks; a consumer that stops early
    has fetched only what it used. Errors are the Hub client's, translated."""
    from .datasets import iter_file_texts

    fs = _filesystem(token, endpoint)
    try:
        for name in files:
            remote = _remote(repo_id, sha, name)
            yield from iter_file_texts(lambda remote=remote: fs.open(remote, "rb", block_size=block_bytes),
                                       Path(name), text_column, scan_bytes=block_bytes)  # fmt: skip
    except (InvalidInput, JobError):
        raise
    except Exception as exc:  # noqa: BLE001 - fsspec and the Hub client's HTTP and network errors
        raise hub.translate_error(exc, repo_id, sha, bool(token)) from None


def _parquet_schema(fs, plan: DatasetPlan, name: str):
    """A Hub parquet file's schema from its footer alone (a few KB by HTTP Range); a damaged
    footer is a refusal that says so, not pyarrow's OSError or ArrowInvalid."""
    import pyarrow.parquet as pq

    with fs.open(_remote(plan.repo_id, plan.sha, name), "rb", block_size=64 << 10) as handle:
        try:
            parquet = pq.ParquetFile(handle)
            return parquet.schema_arrow, parquet.metadata.num_rows
        except (OSError, ValueError) as exc:
            # pyarrow says a damaged footer with a plain OSError or an ArrowInvalid (a ValueError);
            # the Hub client's HTTP errors are OSError subclasses, and are not the file's fault.
            if type(exc) is not OSError and not isinstance(exc, ValueError):
                raise
            raise InvalidInput("file", f"{name} cannot be read as .parquet: its footer (metadata) is damaged.",
                               code="corrupt_file") from None  # fmt: skip


def check_text_column(plan: DatasetPlan, text_column: str, token: str | None, endpoint: str) -> None:
    """Before any record is made: the split's first file is readable and has the text column
    as text (a parquet file by its footer's schema, a few KB; any other by its first rows).
    InvalidInput otherwise, with what the file does have."""
    if not plan.files:
        return
    name = plan.files[0]
    try:
        if name.lower().endswith(".parquet"):
            check_parquet_text_column(_parquet_schema(_filesystem(token, endpoint), plan, name)[0], name, text_column)
        else:
            next(iter(stream_texts(plan.repo_id, plan.sha, [name], text_column, token, endpoint, PROBE_BYTES)), None)
    except (InvalidInput, JobError):
        raise
    except Exception as exc:  # noqa: BLE001 - the Hub client's HTTP and network errors
        raise hub.translate_error(exc, plan.repo_id, plan.sha, bool(token)) from None


def stream_summary(plan: DatasetPlan, text_column: str, token: str | None, endpoint: str) -> tuple[int | None, list[str]]:
    """Row count from the parquet footers (None when a file is not parquet: jsonl and text
    say how many rows only when read whole) and the first rows, read over HTTP Range."""
    fs = _filesystem(token, endpoint)
    count: int | None = 0
    for name in plan.files:
        if not name.lower().endswith(".parquet"):
            count = None
            break
        count += _parquet_schema(fs, plan, name)[1]
    preview = []
    for text in stream_texts(plan.repo_id, plan.sha, list(plan.files), text_column, token, endpoint):
        preview.append(preview_text(text))
        if len(preview) == PREVIEW_ROWS:
            break
    return count, preview
