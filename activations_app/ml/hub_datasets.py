"""Text datasets from Hub dataset repos, through the same client, endpoint and error
translation as model downloads (so the loopback Hub tests them too)."""

from __future__ import annotations

import re
from pathlib import Path

from models_app.ml import hub
from models_app.ml.errors import JobError

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


def download_dataset(repo_id: str, revision: str, split: str, token: str | None, endpoint: str, dest: Path) -> list[Path]:
    """The split's data files into `dest`; returns their local paths in order."""
    from huggingface_hub import HfApi, hf_hub_download

    try:
        info = HfApi(endpoint=endpoint).dataset_info(repo_id, revision=revision, files_metadata=True, token=token or False)
        files = split_files([s.rfilename for s in info.siblings or []], split)
        dest.mkdir(parents=True, exist_ok=True)
        return [
            Path(hf_hub_download(repo_id, name, repo_type="dataset", revision=info.sha, local_dir=dest,
                                 endpoint=endpoint, token=token or False))
            for name in files
        ]  # fmt: skip
    except JobError:
        raise
    except BaseException as exc:  # noqa: BLE001 - translated into a message a user can act on
        raise hub.translate_error(exc, repo_id, revision, bool(token)) from None
