"""Text datasets from Hub dataset repos, through the same client, endpoint and error
translation as model downloads (so the loopback Hub tests them too)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mistudio import hub
from mistudio.errors import JobError

from .datasets import FORMATS


def split_files(paths: list[str], split: str) -> list[str]:
    """The repo's data files of `split`: files named after it (train.jsonl,
    data/train-00000-of-00002.parquet, train/part.csv); every data file when the repo has
    no split names at all."""
    data = sorted(p for p in paths if Path(p).suffix.lower() in FORMATS and not Path(p).name.startswith("."))
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

    @property
    def total_bytes(self) -> int:
        return sum(self.file_sizes[f] for f in self.files)


def plan_dataset(
    repo_id: str, revision: str, split: str, token: str | None, endpoint: str, retries: int = 3, backoff_seconds: float = 2.0
) -> DatasetPlan:
    """The split's data files and their sizes at the commit `revision` resolves to."""
    from huggingface_hub import HfApi

    def fetch() -> DatasetPlan:
        info = HfApi(endpoint=endpoint).dataset_info(repo_id, revision=revision, files_metadata=True, token=token or False)
        sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
        return DatasetPlan(repo_id, revision, str(info.sha), tuple(split_files(list(sizes), split)), sizes)

    return hub.with_retries(fetch, retries, backoff_seconds, lambda e: hub.translate_error(e, repo_id, revision, bool(token)))


def download_dataset(plan: DatasetPlan, dest: Path, token: str | None, endpoint: str, on_bytes: hub.ByteCallback,
                     retries: int = 3, backoff_seconds: float = 2.0) -> None:  # fmt: skip
    """The split's files into `dest` through the shared Hub client (progress, retries, resume)."""
    hub.download_repo_files(
        plan.repo_id, plan.sha, plan.files, plan.file_sizes, dest, token, endpoint, on_bytes, repo_type="dataset",
        revision_asked=plan.revision, retries=retries, backoff_seconds=backoff_seconds,
    )  # fmt: skip
