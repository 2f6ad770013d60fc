"""Exports of a finished extraction for the trainers that read activations directly.

SAELens: one Hugging Face `datasets` dataset per layer/hook, in the layout SAELens'
ActivationsStore loads with `cached_activations_path`: a column named by the
TransformerLens hook (`blocks.{i}.hook_resid_post`, `blocks.{i}.hook_mlp_out`,
`blocks.{i}.hook_attn_out`) of `Array2D(seq_len, d)` and `token_ids`. Written with the
`datasets` library itself, streamed row block by row block from the memory-mapped .npy
files (never a whole file in memory), into a staged folder moved into place when whole."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mistudio.errors import JobError
from mistudio.staging import promote, staged_path

TRANSFORMERLENS_HOOKS = {"residual": "hook_resid_post", "mlp": "hook_mlp_out", "attention": "hook_attn_out"}
FORMATS = ("saelens",)
ROWS_PER_BLOCK = 64


def hook_name(layer: int, hook: str) -> str:
    return f"blocks.{layer}.{TRANSFORMERLENS_HOOKS[hook]}"


def export_saelens(extraction_dir: Path, out_dir: Path, on_progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """One dataset per layer/hook under `out_dir/{hook name}/`; the folders' paths."""
    import datasets

    metadata = _metadata(extraction_dir)
    layers, hooks = metadata["config"]["layers"], metadata["config"]["hook_types"]
    tokens = np.load(extraction_dir / "tokens.npy", mmap_mode="r")
    n, seq_len = tokens.shape
    total, done = n * len(layers) * len(hooks), 0
    tmp = staged_path(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    written = []
    try:
        for layer in layers:
            for hook in hooks:
                values = np.load(extraction_dir / f"layer_{layer}_{hook}.npy", mmap_mode="r")
                name = hook_name(layer, hook)
                features = datasets.Features({
                    name: datasets.Array2D(shape=(seq_len, values.shape[2]), dtype=str(values.dtype)),
                    "token_ids": datasets.Sequence(datasets.Value("int32"), length=seq_len),
                })  # fmt: skip

                def rows(values=values, name=name):
                    nonlocal done
                    for start in range(0, n, ROWS_PER_BLOCK):
                        block = np.asarray(values[start : start + ROWS_PER_BLOCK])  # one block in memory
                        ids = np.asarray(tokens[start : start + ROWS_PER_BLOCK], dtype=np.int32)
                        for row, row_ids in zip(block, ids, strict=True):
                            yield {name: row, "token_ids": row_ids}
                        done += len(block)
                        if on_progress:
                            on_progress(done, total)

                cache = tmp / ".cache"
                # An explicit fingerprint: else `datasets` hashes the generator's closure, which
                # pickles the whole memory-mapped array.
                dataset = datasets.Dataset.from_generator(rows, features=features, cache_dir=str(cache),
                                                          writer_batch_size=ROWS_PER_BLOCK, fingerprint=uuid.uuid4().hex)  # fmt: skip
                dataset.save_to_disk(str(tmp / name))
                del dataset
                shutil.rmtree(cache, ignore_errors=True)
                written.append(out_dir / name)
        (tmp / "export.json").write_text(json.dumps({
            "format": "saelens", "extraction_id": metadata.get("extraction_id"), "context_size": seq_len,
            "hooks": [hook_name(layer, hook) for layer in layers for hook in hooks],
            "prepend_bos": metadata.get("prepend_bos"), "model": metadata.get("model"),
        }, indent=2))  # fmt: skip
        promote(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written


def _metadata(extraction_dir: Path) -> dict:
    try:
        return json.loads((extraction_dir / "metadata.json").read_text())
    except (OSError, ValueError):
        raise JobError("not_exportable", f"{extraction_dir.name} has no readable metadata.json; it is not a finished extraction.") from None
