"""Activation extraction: tokenize, run the model batch by batch with hooks, stream every
captured tensor into preallocated .npy files and into running statistics.

Memory is bounded by one batch whatever the dataset size: files are memory-mapped and
filled in place, statistics are running sums. Files live in a temporary folder next to
the final one and are moved into place only when complete, with metadata.json last."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from mistudio.errors import JobError
from mistudio.staging import promote, staged_path

from .hooks import HookTargets, StopForward, capture_activations, hook_targets
from .stats import RunningStats

STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}
TOKENIZATIONS = {"packed": "packed (EOS-joined windows)", "truncate": "truncate (one row per document, padded)"}


@dataclass
class ExtractionSpec:
    """One extraction request, validated: what the job runs, what the row stores (a column
    per request field) and what metadata.json records. The defaults here are the dialog's,
    the API's and the command's."""

    layers: list[int]
    hook_types: list[str]
    batch_size: int = 32
    max_samples: int = 1000
    seq_len: int = 128
    dtype: str = "float16"
    tokenization: str = "packed"  # or "truncate"
    sparsity_threshold: float = field(default=0.01, metadata={"request": False})

    @classmethod
    def request_fields(cls) -> list[str]:
        """The fields a request sets (and the row stores)."""
        return [f.name for f in fields(cls) if f.metadata.get("request", True)]

    @classmethod
    def default(cls, name: str):
        return next(f.default for f in fields(cls) if f.name == name)

    def request(self) -> dict:
        return {name: getattr(self, name) for name in self.request_fields()}


@dataclass
class Tokens:
    ids: np.ndarray  # [num_samples, seq_len], int64
    mask: np.ndarray | None  # [num_samples, seq_len], bool; None when every position is real (packed)


class _Rows:
    """Rows of token ids gathered in fixed-size numpy blocks: 8 bytes a token where Python
    lists of ints take about 36, and one copy into the final array at the end (peak: the
    final array plus one block)."""

    BLOCK_ROWS = 1024

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len
        self.blocks: list[np.ndarray] = []
        self.fill = 0
        self.count = 0

    def extend(self, rows: np.ndarray) -> None:
        start = 0
        while start < len(rows):
            if not self.blocks or self.fill == self.BLOCK_ROWS:
                self.blocks.append(np.empty((self.BLOCK_ROWS, self.seq_len), dtype=np.int64))
                self.fill = 0
            take = min(self.BLOCK_ROWS - self.fill, len(rows) - start)
            self.blocks[-1][self.fill : self.fill + take] = rows[start : start + take]
            self.fill += take
            self.count += take
            start += take

    def array(self) -> np.ndarray:
        out = np.empty((self.count, self.seq_len), dtype=np.int64)
        at = 0
        while self.blocks:
            block = self.blocks.pop(0)
            n = min(self.BLOCK_ROWS, self.count - at)
            out[at : at + n] = block[:n]
            at += n
        return out


def tokenize(texts: Iterable[str], tokenizer, seq_len: int, mode: str, max_samples: int) -> Tokens:
    """`packed`: documents joined with EOS and cut into full windows (no padding, the tail
    that does not fill a window is dropped). `truncate`: one row per document, cut at
    seq_len, right-padded (pad token, else EOS, else 0: the mask marks them either way).
    Stops reading documents once max_samples rows exist."""
    if mode not in TOKENIZATIONS:
        raise JobError("invalid_tokenization", f"Tokenization must be packed or truncate, not {mode!r}.")
    eos = tokenizer.eos_token_id
    rows = _Rows(seq_len)
    if mode == "packed":
        if eos is None:
            raise JobError("invalid_tokenization", "Packed tokenization needs the tokenizer's EOS token; it has none.")
        pending = np.empty(0, dtype=np.int64)  # fewer than seq_len ids carried into the next document
        for text in texts:
            document = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"] + [eos], dtype=np.int64)
            pending = np.concatenate([pending, document])
            full = min(len(pending) // seq_len, max_samples - rows.count)
            if full:
                rows.extend(pending[: full * seq_len].reshape(full, seq_len))
                pending = pending[full * seq_len :]
            if rows.count >= max_samples:
                break
        return Tokens(ids=rows.array(), mask=None)
    pad = next((t for t in (tokenizer.pad_token_id, eos) if t is not None), 0)
    lengths = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=seq_len)["input_ids"][:seq_len]
        if not ids:
            continue
        row = np.full((1, seq_len), pad, dtype=np.int64)
        row[0, : len(ids)] = ids
        rows.extend(row)
        lengths.append(len(ids))
        if rows.count >= max_samples:
            break
    mask = np.arange(seq_len)[None, :] < np.asarray(lengths, dtype=np.int64).reshape(-1, 1)
    return Tokens(ids=rows.array(), mask=mask.reshape(len(lengths), seq_len))


def file_stem(layer: int, hook: str) -> str:
    return f"layer_{layer}_{hook}"


def storage_bytes(num_samples: int, seq_len: int, hidden: int, dtype: str, files: int, with_mask: bool = False) -> int:
    """Exactly what the output takes: every activation file (with its .npy header), tokens.npy
    and, in truncate mode, attention_mask.npy (metadata.json aside)."""
    itemsize = np.dtype(STORAGE_DTYPES[dtype]).itemsize
    header = _npy_header_bytes((num_samples, seq_len, hidden), STORAGE_DTYPES[dtype])
    tokens = _npy_header_bytes((num_samples, seq_len), np.int64) + num_samples * seq_len * 8
    mask = _npy_header_bytes((num_samples, seq_len), np.bool_) + num_samples * seq_len if with_mask else 0
    return files * (header + num_samples * seq_len * hidden * itemsize) + tokens + mask


def _npy_header_bytes(shape, dtype) -> int:
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": tuple(shape)})  # fmt: skip
    return buffer.tell()


class ActivationWriter:
    """Preallocated .npy files in a temporary folder, filled batch by batch, moved into
    place as a whole. Space is reserved up front, so a full disk fails before the first
    batch instead of leaving a sparse file that crashes later."""

    def __init__(self, final_dir: Path, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, np.dtype]) -> None:
        self.final_dir = final_dir
        self.tmp_dir = staged_path(final_dir)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir(parents=True)
        self.arrays: dict[str, np.memmap] = {}
        try:
            for stem, shape in shapes.items():
                path = self.tmp_dir / f"{stem}.npy"
                array = np.lib.format.open_memmap(path, mode="w+", dtype=dtypes[stem], shape=shape)
                reserve(path)
                self.arrays[stem] = array
        except BaseException:
            self.discard()
            raise

    def write(self, stem: str, start: int, values: np.ndarray) -> None:
        self.arrays[stem][start : start + len(values)] = values

    def commit(self, metadata: dict) -> Path:
        for array in self.arrays.values():
            array.flush()
        self.arrays.clear()
        (self.tmp_dir / "metadata.json").write_text(json.dumps(metadata, indent=2))
        return promote(self.tmp_dir, self.final_dir)

    def discard(self) -> None:
        self.arrays.clear()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def reserve(path: Path) -> None:
    """Allocate the file's blocks now (posix_fallocate): ENOSPC here, not mid-run."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        raise JobError("disk_full", f"Not enough disk space for {path.name} ({size:,} bytes): {exc.strerror}.") from None
    finally:
        os.close(fd)


@dataclass
class ExtractionResult:
    output_dir: Path
    statistics: dict[str, dict]
    num_samples: int
    seconds: float
    samples_per_second: float
    batch_sizes: list[int] = field(default_factory=list)


def run_extraction(
    model,
    model_type: str,
    tokens: Tokens,
    spec: ExtractionSpec,
    final_dir: Path,
    metadata: dict,
    on_progress: Callable[[int, int, float], None] | None = None,
    on_saving: Callable[[], None] | None = None,
    targets: HookTargets | None = None,
) -> ExtractionResult:
    """Forward every batch once, capturing the requested hooks, writing and summarizing as
    it goes. A CUDA out-of-memory halves the batch and retries the same rows. `targets`,
    when the caller found them already, are the modules to hook."""
    import torch

    if len(tokens.ids) == 0:
        raise JobError("empty_dataset", "The dataset produced no samples at this sequence length.")
    # Bad layers or hooks are refused here, before any file exists.
    targets = targets or hook_targets(model, spec.layers, spec.hook_types)
    hidden = int(model.config.hidden_size)
    n, seq_len = tokens.ids.shape
    storage = STORAGE_DTYPES[spec.dtype]
    stems = [file_stem(layer, hook) for layer in spec.layers for hook in spec.hook_types]
    shapes = {stem: (n, seq_len, hidden) for stem in stems}
    dtypes = {stem: np.dtype(storage) for stem in stems}
    shapes["tokens"], dtypes["tokens"] = (n, seq_len), np.dtype(np.int64)
    if tokens.mask is not None:
        shapes["attention_mask"], dtypes["attention_mask"] = (n, seq_len), np.dtype(bool)
    writer = ActivationWriter(final_dir, shapes, dtypes)
    stats = {stem: RunningStats(spec.sparsity_threshold) for stem in stems}
    device = next(model.parameters()).device
    torch_storage = torch.float16 if spec.dtype == "float16" else torch.float32
    started = time.perf_counter()
    batch_sizes: list[int] = []
    try:
        writer.write("tokens", 0, tokens.ids)
        if tokens.mask is not None:
            writer.write("attention_mask", 0, tokens.mask)
        current: dict = {}

        def on_capture(layer: int, hook: str, tensor) -> None:
            current[file_stem(layer, hook)] = tensor.detach().to(torch_storage).cpu()

        batch = spec.batch_size
        start = 0
        with capture_activations(targets, on_capture), torch.no_grad():
            while start < n:
                end = min(n, start + batch)
                ids = torch.from_numpy(tokens.ids[start:end]).to(device)
                mask = None if tokens.mask is None else torch.from_numpy(tokens.mask[start:end]).to(device)
                current.clear()
                try:
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
                except StopForward:
                    pass
                except torch.cuda.OutOfMemoryError:
                    if batch == 1:
                        raise JobError("out_of_memory", "Out of GPU memory even with a batch of 1.") from None
                    batch = max(1, batch // 2)
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    continue
                valid = None if tokens.mask is None else torch.from_numpy(tokens.mask[start:end])
                for stem in stems:
                    values = current[stem]
                    writer.write(stem, start, values.numpy())
                    stats[stem].update(values, valid)
                batch_sizes.append(end - start)
                start = end
                if on_progress:
                    on_progress(start, n, time.perf_counter() - started)
        seconds = time.perf_counter() - started
        summary = {stem: s.result() for stem, s in stats.items()}
        metadata = {
            **metadata,
            "config": asdict(spec),
            "num_samples": n,
            "shapes": {stem: list(shape) for stem, shape in shapes.items()},
            "dtype": spec.dtype,
            "timings": {"seconds": round(seconds, 3), "samples_per_second": round(n / seconds, 3) if seconds else None},
            "statistics": summary,
        }
        if on_saving:
            on_saving()  # flushing the files to disk can take minutes for a large run
        output = writer.commit(metadata)
    except BaseException:
        writer.discard()
        raise
    return ExtractionResult(output, summary, n, seconds, n / seconds if seconds else math.inf, batch_sizes)
