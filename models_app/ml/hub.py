"""Model downloads from the Hugging Face Hub: plan (file list, sizes, commit), the early
config.json, then the snapshot through the shared Hub client (`mistudio.hub`).

Tokens are passed explicitly: `token=False` when the user gave none, so a worker's own
HF_TOKEN or cached login is never sent on their behalf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mistudio.errors import JobError
from mistudio.hub import ByteCallback, Digest, digests_of, download_repo_files, translate_error, with_retries

from .loading import SIDECAR_FILES


@dataclass(frozen=True)
class DownloadPlan:
    repo_id: str
    revision: str  # what the user asked for
    sha: str  # the commit it resolved to
    files: tuple[str, ...]
    file_sizes: dict[str, int]
    gated: bool
    digests: dict[str, Digest] = field(default_factory=dict)  # what each file must hash to (the Hub's)

    @property
    def total_bytes(self) -> int:
        return sum(self.file_sizes[f] for f in self.files)


def select_files(sizes: dict[str, int]) -> list[str]:
    """Root-level config, tokenizer and weights; safetensors over .bin when both exist.
    Sub-folders (original/, onnx/, …) and other formats are never fetched."""
    root = {name for name in sizes if "/" not in name}
    safetensors = sorted(n for n in root if n.endswith(".safetensors"))
    if "model.safetensors.index.json" in root:
        # Mistral repos ship their native-format `consolidated.safetensors` beside the sharded
        # transformers checkpoint; transformers reads only the shards its index names.
        safetensors = [n for n in safetensors if not n.startswith("consolidated")]
    if safetensors:
        weights = safetensors + [n for n in ("model.safetensors.index.json",) if n in root]
    else:
        weights = sorted(n for n in root if n.startswith("pytorch_model") and n.endswith(".bin"))
        weights += [n for n in ("pytorch_model.bin.index.json",) if n in root]
    if not weights:
        raise JobError(
            "no_weights",
            "The repository has no safetensors or PyTorch .bin weights at its root. "
            "For a GGUF-only repository, download the .gguf file and use import_model.",
        )
    sidecars = [n for n in SIDECAR_FILES if n in root]
    if "config.json" not in sidecars:
        raise JobError("invalid_model", "The repository has no config.json at its root.")
    return sidecars + weights


def plan_download(
    repo_id: str,
    revision: str,
    token: str | None,
    endpoint: str,
    retries: int = 3,
    backoff_seconds: float = 2.0,
) -> DownloadPlan:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint)

    def fetch() -> DownloadPlan:
        info = api.model_info(repo_id, revision=revision, files_metadata=True, token=token or False)
        sizes = {s.rfilename: int(s.size or 0) for s in (info.siblings or [])}
        files = select_files(sizes)
        return DownloadPlan(repo_id, revision, str(info.sha), tuple(files), sizes, bool(info.gated), digests_of(info.siblings))

    return with_retries(fetch, retries, backoff_seconds, lambda e: translate_error(e, repo_id, revision, bool(token)))


def fetch_file(plan: DownloadPlan, filename: str, dest: Path, token: str | None, endpoint: str) -> Path:
    """One small file (config.json for the early architecture check) into `dest`, checked
    against the Hub's hash like the rest (the full download then keeps it)."""
    download_repo_files(plan.repo_id, plan.sha, (filename,), plan.file_sizes, dest, token, endpoint, lambda done, total: None,
                        digests=plan.digests, revision_asked=plan.revision, retries=1)  # fmt: skip
    return dest / filename


def fetch_config(plan: DownloadPlan, token: str | None, endpoint: str) -> dict:
    """The repo's config.json alone, read through a temporary folder (no weights fetched)."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mistudio-config-") as tmp:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(plan.repo_id, "config.json", revision=plan.sha, local_dir=tmp, endpoint=endpoint,
                                        token=token or False))  # fmt: skip
        except BaseException as exc:  # noqa: BLE001
            raise translate_error(exc, plan.repo_id, plan.revision, bool(token)) from None
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise JobError("invalid_model", "The repository's config.json is not valid JSON.") from None


def download_snapshot(
    plan: DownloadPlan,
    dest: Path,
    token: str | None,
    endpoint: str,
    on_bytes: ByteCallback,
    retries: int = 3,
    backoff_seconds: float = 2.0,
) -> None:
    """The planned files into `dest` (see `mistudio.hub.download_repo_files`)."""
    download_repo_files(
        plan.repo_id, plan.sha, plan.files, plan.file_sizes, dest, token, endpoint, on_bytes, digests=plan.digests,
        revision_asked=plan.revision, retries=retries, backoff_seconds=backoff_seconds,
    )  # fmt: skip
