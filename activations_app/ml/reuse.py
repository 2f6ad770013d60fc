"""Reuse instead of recompute: a request's layer/hook files that a finished extraction
already holds for the same model files and the same token windows are taken from it, not
computed again.

The caller names the candidates (finished extractions of the same model and dataset with
the same tokenization, sequence length, BOS policy, separator and dtype); a candidate
serves only if its tokens.npy (and attention mask) start with exactly this request's rows,
so a changed dataset file or tokenizer never passes. A file of as many rows is a hard link
(no new space; deleting either extraction keeps the other's), with its statistics taken as
they are when they were made by the same rules; a file of more rows gives its first rows
(a copy) and the statistics are computed over them."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mistudio.errors import JobError

from .stats import statistics_over
from .tokens import Tokens
from .writer import file_stem, npy_header, open_new_npy


@dataclass(frozen=True)
class ReusedFile:
    """One requested file found in a finished extraction's folder."""

    stem: str
    source_id: str  # the extraction it comes from
    folder: Path
    shape: tuple[int, int, int]  # the source file's (rows: at least the request's, seq_len, hidden)
    offset: int  # where its data starts
    statistics: dict | None  # the source's figures, when made over exactly these rows
    same_rules: list | None  # what those figures left out (metadata.json's statistics_exclude)
    hook_module: str | None  # the module path metadata.json records


def find_reusable(candidates: list[tuple[str, Path]], tokens: Tokens, stems: list[str], dtype,
                  sparsity_threshold: float) -> dict[str, ReusedFile]:  # fmt: skip
    """For each of `stems`, the first candidate ((extraction id, folder), best first) whose
    rows start with exactly `tokens` and which holds that file whole."""
    n, seq_len = tokens.ids.shape
    found: dict[str, ReusedFile] = {}
    for source_id, folder in candidates:
        wanted = [stem for stem in stems if stem not in found]
        if not wanted:
            break
        try:
            metadata = json.loads((folder / "metadata.json").read_text())
            if not _same_rows(folder, tokens):
                continue
        except (OSError, ValueError, TypeError):
            continue
        same_rows = int(metadata.get("num_samples", -1)) == n and metadata.get("excluded_token_ids") == list(tokens.excluded_ids)
        threshold = (metadata.get("config") or {}).get("sparsity_threshold") == sparsity_threshold
        for stem in wanted:
            try:
                array = np.load(folder / f"{stem}.npy", mmap_mode="r")
            except (OSError, ValueError):
                continue
            if array.dtype != np.dtype(dtype) or array.ndim != 3 or array.shape[0] < n or array.shape[1] != seq_len:
                continue
            statistics = (metadata.get("statistics") or {}).get(stem) if same_rows and threshold and array.shape[0] == n else None
            if statistics is not None and not (folder / f"{stem}.stats.npz").is_file():
                statistics = None
            found[stem] = ReusedFile(stem, source_id, folder, tuple(map(int, array.shape)), int(array.offset), statistics,
                                     metadata.get("statistics_exclude"), (metadata.get("hook_modules") or {}).get(stem))  # fmt: skip
            del array
    return found


def _same_rows(folder: Path, tokens: Tokens) -> bool:
    n = len(tokens.ids)
    theirs = np.load(folder / "tokens.npy", mmap_mode="r")
    if theirs.ndim != 2 or theirs.shape[0] < n or theirs.shape[1] != tokens.ids.shape[1] or not np.array_equal(theirs[:n], tokens.ids):
        return False
    mask_path = folder / "attention_mask.npy"
    if tokens.mask is None:
        return not mask_path.exists()
    theirs = np.load(mask_path, mmap_mode="r")
    return theirs.shape[1:] == tokens.mask.shape[1:] and theirs.shape[0] >= n and np.array_equal(theirs[:n], tokens.mask)


def adopt(reused: ReusedFile, into: Path, tokens: Tokens, counted: np.ndarray, spec, exclude: list[str]) -> dict:
    """The reused file (with its .stats.npz and .norms.npy) in the staged folder `into`;
    its statistics' summary, as run_extraction reports them. Linked where the source holds
    exactly these rows and its figures were made by the same rules; else the values are
    linked (or their first rows copied) and the figures and norms computed over them. A
    source deleted meanwhile fails the run with a reason (a retry computes the files)."""
    try:
        return _adopt(reused, into, tokens, counted, spec, exclude)
    except FileNotFoundError:
        raise JobError("reuse_source_gone", f"{reused.source_id}, whose {reused.stem} this run was taking, was deleted "
                                            "meanwhile; retry to compute it.") from None  # fmt: skip


def _adopt(reused: ReusedFile, into: Path, tokens: Tokens, counted: np.ndarray, spec, exclude: list[str]) -> dict:
    n = len(tokens.ids)
    names = {suffix: (reused.folder / f"{reused.stem}{suffix}", into / f"{reused.stem}{suffix}")
             for suffix in (".npy", ".stats.npz", ".norms.npy")}  # fmt: skip
    for _, target in names.values():
        target.unlink(missing_ok=True)  # never written through: it may be a link to another extraction's file
    source, target = names[".npy"]
    if reused.shape[0] == n:
        _link(source, target)
    else:
        _copy_first_rows(reused, target, n)
    if reused.statistics is not None and reused.same_rules == exclude and names[".norms.npy"][0].is_file():
        for suffix in (".stats.npz", ".norms.npy"):
            _link(*names[suffix])
        return dict(reused.statistics)
    norms = open_new_npy(names[".norms.npy"][1], tokens.ids.shape, np.float32)
    stats = statistics_over(np.load(target, mmap_mode="r"), counted, spec.sparsity_threshold, spec.batch_size, norms)
    norms.flush()
    del norms
    np.savez(names[".stats.npz"][1], **stats.dimension_arrays())
    return stats.result()


def _copy_first_rows(reused: ReusedFile, target: Path, n: int) -> None:
    """The source's first n rows as a .npy of its own: a new header, then the rows' bytes as
    they are (in the kernel where it can: copy_file_range)."""
    source = reused.folder / f"{reused.stem}.npy"
    shape, dtype = (n, *reused.shape[1:]), np.load(source, mmap_mode="r").dtype
    header = npy_header(shape, dtype)
    length = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    with source.open("rb", buffering=0) as src, target.open("wb", buffering=0) as dst:
        dst.write(header)
        done = 0
        while done < length:
            at = reused.offset + done
            try:
                copied = os.copy_file_range(src.fileno(), dst.fileno(), length - done, at, len(header) + done)
            except (AttributeError, OSError):
                copied = os.pwrite(dst.fileno(), os.pread(src.fileno(), min(length - done, 64 << 20), at), len(header) + done)
            if not copied:
                raise OSError(f"{source.name} ended early")
            done += copied


def _link(source: Path, target: Path) -> None:
    """A hard link: the same bytes, no new space, and either name can go without the other.
    A copy where the filesystem has none (another device, no links)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def layer_span(layers: list[int]) -> str:
    """0, 1, 2, 3, 7 as "0–3, 7"."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(f"{run[0]}–{run[-1]}" if len(run) > 2 else ", ".join(map(str, run)) for run in runs)


def describe(layers: list[int], hooks: list[str], reused: set[str]) -> str:
    """Which of a request's files are reused and which computed, as the dialog and the job's
    notice say it: "layers 0–5 reused, 6 computed", by hook where the hooks differ."""

    def split(hook: str) -> str:
        taken = [layer for layer in layers if file_stem(layer, hook) in reused]
        made = [layer for layer in layers if file_stem(layer, hook) not in reused]
        said = [f"layer{'s' if len(taken) > 1 else ''} {layer_span(taken)} reused"] if taken else []
        if made:
            said.append(f"{layer_span(made)} computed" if taken else f"layer{'s' if len(made) > 1 else ''} {layer_span(made)} computed")
        return ", ".join(said)

    phrases = {hook: split(hook) for hook in hooks}
    if len(set(phrases.values())) == 1:
        return phrases[hooks[0]]
    return "; ".join(f"{hook}: {phrase}" for hook, phrase in phrases.items())
