"""Activation extraction: tokenize, run the model batch by batch with hooks, stream every
captured tensor into preallocated .npy files and into running statistics.

Memory is bounded by one batch whatever the dataset size: files are memory-mapped and
filled in place, statistics are running sums. Files live in a temporary folder next to
the final one and are moved into place only when complete, with metadata.json last."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from mistudio.errors import JobError, resumable
from mistudio.staging import promote, staged_path

from .hooks import HookTargets, StopForward, capture_activations, hook_targets
from .stats import NORM_BIN_EDGES, RunningStats

STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}
TOKENIZATIONS = {"packed": "packed (documents joined into full windows)", "truncate": "truncate (one row per document, padded)"}
PREPEND_BOS = {"always": "always (BOS first in every row, as SAELens and TransformerLens do)",
               "auto": "auto (as the tokenizer does)", "never": "never"}  # fmt: skip
SEPARATORS = {"bos": "BOS (as SAELens packs)", "eos": "EOS"}
# What the statistics leave out, recorded in metadata.json: position 0 of every row (BOS, or
# where there is none the attention sink, whose residual norm is 10-100x the rest's whatever
# token sits there), every BOS token (packed separators included) and padding.
STATISTICS_EXCLUDE = ("position_0", "bos", "padding")


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
    prepend_bos: str = "always"  # "auto", "never"
    separator: str = "bos"  # between packed documents: "bos" (BOS, else EOS) or "eos"
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
    bos_token_id: int | None = None  # set when every row starts with it (position 0 is BOS)
    excluded_ids: tuple[int, ...] = ()  # tokens the statistics leave out wherever they are (the tokenizer's BOS)

    def statistics_mask(self) -> np.ndarray:
        """Positions the statistics count (STATISTICS_EXCLUDE): real tokens, but never
        position 0 (with or without a BOS there: the first position is where the attention
        sink forms, a norm of about 23,700 in SmolLM2's residual against about 174 elsewhere)
        nor a BOS anywhere."""
        keep = np.ones(self.ids.shape, dtype=bool) if self.mask is None else self.mask.copy()
        keep[:, 0] = False
        for token in self.excluded_ids:
            keep &= self.ids != token
        return keep


def bos_token(tokenizer, prepend_bos: str) -> int | None:
    """The token every row starts with, or None. `auto` does what the tokenizer itself does
    with special tokens; `always` uses BOS, else EOS (as TransformerLens does for GPT-2)."""
    if prepend_bos not in PREPEND_BOS:
        raise JobError("invalid_input", f"prepend_bos must be auto, always or never, not {prepend_bos!r}.")
    if prepend_bos == "never":
        return None
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prepend_bos == "always":
        if bos is None:
            raise JobError("invalid_input", "prepend_bos=always needs a BOS or EOS token; the tokenizer has neither.")
        return bos
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    adds = tokenizer.bos_token_id is not None and with_special[:1] == [tokenizer.bos_token_id] and without[:1] != with_special[:1]
    return tokenizer.bos_token_id if adds else None


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


def tokenize(texts: Iterable[str], tokenizer, seq_len: int, mode: str, max_samples: int, prepend_bos: str = "never",
             separator: str = "eos") -> Tokens:  # fmt: skip
    """`packed`: documents joined, each followed by the separator (BOS, else EOS, as SAELens
    packs; or EOS), and cut into full windows (no padding, the tail that does not fill a
    window is dropped). `truncate`: one row per document, cut at seq_len, right-padded (pad
    token, else EOS, else 0: the mask marks them either way). With a BOS (see bos_token),
    every row starts with it, followed by seq_len - 1 text tokens (SAELens' convention for
    packed windows). Stops reading documents once max_samples rows exist."""
    if mode not in TOKENIZATIONS:
        raise JobError("invalid_tokenization", f"Tokenization must be packed or truncate, not {mode!r}.")
    if separator not in SEPARATORS:
        raise JobError("invalid_input", f"separator must be bos or eos, not {separator!r}.")
    bos = bos_token(tokenizer, prepend_bos)
    excluded = (tokenizer.bos_token_id,) if tokenizer.bos_token_id is not None else ()
    tokens = _tokenize(texts, tokenizer, seq_len - (bos is not None), mode, max_samples, separator)
    if bos is None:
        return Tokens(ids=tokens.ids, mask=tokens.mask, excluded_ids=excluded)
    if seq_len < 2:
        raise JobError("invalid_input", "With a BOS first, the sequence length must be at least 2.")
    ids = np.concatenate([np.full((len(tokens.ids), 1), bos, dtype=np.int64), tokens.ids], axis=1)
    mask = None if tokens.mask is None else np.concatenate([np.ones((len(ids), 1), dtype=bool), tokens.mask], axis=1)
    return Tokens(ids=ids, mask=mask, bos_token_id=bos, excluded_ids=excluded)


def separator_token(tokenizer, separator: str) -> int | None:
    """The token between packed documents: `bos` is the tokenizer's BOS, else its EOS (GPT-2
    has one token for both); `eos` its EOS."""
    if separator == "bos" and tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    return tokenizer.eos_token_id


def _tokenize(texts: Iterable[str], tokenizer, seq_len: int, mode: str, max_samples: int, separator: str) -> Tokens:
    eos = tokenizer.eos_token_id
    rows = _Rows(seq_len)
    if mode == "packed":
        joint = separator_token(tokenizer, separator)
        if joint is None:
            raise JobError("invalid_tokenization", "Packed tokenization needs a BOS or EOS token between documents; "
                                                   "the tokenizer has neither.")  # fmt: skip
        pending = np.empty(0, dtype=np.int64)  # fewer than seq_len ids carried into the next document
        for text in texts:
            document = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"] + [joint], dtype=np.int64)
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
    header = len(npy_header((num_samples, seq_len, hidden), STORAGE_DTYPES[dtype]))
    tokens = len(npy_header((num_samples, seq_len), np.int64)) + num_samples * seq_len * 8
    mask = len(npy_header((num_samples, seq_len), np.bool_)) + num_samples * seq_len if with_mask else 0
    return files * (header + num_samples * seq_len * hidden * itemsize) + tokens + mask


# Direct I/O (O_DIRECT) needs the file offset, the length and the memory of every write
# aligned to the device's logical block; 4 KiB covers 512-byte and 4 KiB devices alike.
ALIGN = 4096


def npy_header(shape, dtype) -> bytes:
    """A version 1.0 .npy header, padded with spaces to a multiple of ALIGN (numpy pads to
    64; any reader takes the header length from the file), so the data starts on a block
    boundary and whole batches can be written directly."""
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": tuple(shape)})  # fmt: skip
    header = buffer.getvalue()
    prefix, text = header[:8], header[10:].rstrip(b"\n")  # magic and version; the length field is rewritten
    size = -(-(len(header) + 1) // ALIGN) * ALIGN
    return prefix + (size - 10).to_bytes(2, "little") + text.ljust(size - 11) + b"\n"


def aligned_buffer(shape: tuple[int, ...], dtype):
    """An uninitialized CPU tensor on its own anonymous mapping: page-aligned (what a direct
    write needs of its source) and, where the kernel offers them, in huge pages (one fault
    per 2 MiB where there would be 512)."""
    import mmap

    import torch

    memory = mmap.mmap(-1, math.prod(shape) * torch.empty((), dtype=dtype).element_size())
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            memory.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return torch.frombuffer(memory, dtype=dtype).view(shape)


# One file, replaced atomically: the rows made durable, the request they belong to and the
# running statistics over exactly those rows (a marker and a statistics file apart could be
# caught by a kill between their two renames, pairing one checkpoint's rows with the next's
# statistics).
CHECKPOINT = "checkpoint.npz"


def read_checkpoint(folder: Path, with_stats: bool = False) -> dict | None:
    """A stopped run's marker in its staged folder ({"rows", "fingerprint"}, and "stats",
    the saved statistics, when asked), or None."""
    try:
        with np.load(folder / CHECKPOINT, allow_pickle=False) as saved:
            checkpoint = {"rows": int(saved["__rows__"]), "fingerprint": str(saved["__fingerprint__"])}
            if with_stats:
                checkpoint["stats"] = {key: saved[key] for key in saved.files if "/" in key}
            return checkpoint
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None


class ActivationWriter:
    """Preallocated .npy files in a temporary folder, filled batch by batch with positional
    writes (os.pwrite: no mmap page faults; direct I/O where aligned), moved into place as a
    whole. Space is reserved up front, so a full disk fails before the first batch instead
    of leaving a sparse file that crashes later.

    Resumable: `checkpoint` makes every row written so far durable (fdatasync) and records
    how many, with the running statistics; a later writer over the same folder, the same
    request (`fingerprint`) and the same `tokens` reopens the files and goes on from there."""

    def __init__(self, final_dir: Path, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, np.dtype],
                 fingerprint: str = "", tokens: np.ndarray | None = None) -> None:  # fmt: skip
        self.final_dir = final_dir
        self.tmp_dir = staged_path(final_dir)
        self.fingerprint = fingerprint
        self.tokens = tokens
        self.fds: dict[str, int] = {}
        self.direct: dict[str, int | None] = {}  # the same files opened for direct I/O, where the filesystem allows
        self.offsets: dict[str, int] = {}
        self.row_bytes: dict[str, int] = {}
        self.resumed_rows = 0
        self.resumed_stats: dict | None = None
        self.restart_reason = ""  # why a checkpoint found here was not gone on from
        try:
            if not self._reopen(shapes, dtypes):
                self._create(shapes, dtypes)
        except BaseException:
            self.discard()
            raise

    def _create(self, shapes, dtypes) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir(parents=True)
        for stem, shape in shapes.items():
            path = self.tmp_dir / f"{stem}.npy"
            header = npy_header(shape, dtypes[stem])
            path.write_bytes(header)
            reserve(path, len(header) + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtypes[stem]).itemsize)
            self._open(stem, path, len(header), shape, dtypes[stem])

    def _open(self, stem, path, offset, shape, dtype) -> None:
        self.fds[stem] = os.open(path, os.O_RDWR)
        try:  # not every filesystem takes direct I/O (tmpfs, some overlays): then page-cache writes only
            self.direct[stem] = os.open(path, os.O_RDWR | os.O_DIRECT) if hasattr(os, "O_DIRECT") else None
        except OSError:
            self.direct[stem] = None
        self.offsets[stem] = offset
        self.row_bytes[stem] = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize

    def _reopen(self, shapes, dtypes) -> bool:
        """Go on from a checkpoint of the same request over the same tokens, when there is
        one (the data changed under the same request: start over)."""
        if not self.fingerprint or not (self.tmp_dir / CHECKPOINT).exists():
            return False
        checkpoint = read_checkpoint(self.tmp_dir, with_stats=True)
        if checkpoint is None:
            return self._refuse("it cannot be read")
        if checkpoint["fingerprint"] != self.fingerprint:
            return self._refuse("it belongs to another request, model or dataset file")
        for stem, shape in shapes.items():
            path = self.tmp_dir / f"{stem}.npy"
            try:
                array = np.load(path, mmap_mode="r")
                size = path.stat().st_size
            except (OSError, ValueError):
                return self._refuse(f"{stem}.npy cannot be read")
            expected = array.offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtypes[stem]).itemsize
            same = array.shape == tuple(shape) and array.dtype == dtypes[stem] and size == expected
            if same and stem == "tokens" and self.tokens is not None:
                same = np.array_equal(array, self.tokens)
            offset = array.offset
            del array
            if not same:
                return self._refuse(f"{stem}.npy does not match the request" + (" (its tokens differ)" if stem == "tokens" else ""))
            self._open(stem, path, offset, shape, dtypes[stem])
        self.resumed_stats = checkpoint["stats"]
        self.resumed_rows = checkpoint["rows"]
        return True

    def _refuse(self, reason: str) -> bool:
        self._close()
        self.restart_reason = reason
        return False

    def start_over(self, shapes, dtypes, reason: str) -> None:
        """A checkpoint that reopened but does not hold what its rows must (see
        checkpoint_problem): its files go and the run starts from row 0."""
        self._close()
        self.resumed_rows, self.resumed_stats, self.restart_reason = 0, None, reason
        self._create(shapes, dtypes)

    def write(self, stem: str, start: int, values: np.ndarray) -> None:
        """Rows `values` at row `start`. Written directly (O_DIRECT) where offset, length and
        memory are block-aligned, which is every whole batch from an aligned_buffer when a
        batch is a whole number of blocks: no copy into the page cache (measured: 0.07 s of
        CPU for 849 MB, against 0.25 s and up through the page cache) and nothing left for
        the final fsync to flush. Anything else goes through the page cache."""
        values = np.ascontiguousarray(values)
        data, address = memoryview(values).cast("B"), values.ctypes.data
        at = self.offsets[stem] + start * self.row_bytes[stem]
        while data:
            direct = self.direct.get(stem)
            aligned = direct is not None and not (at % ALIGN or len(data) % ALIGN or address % ALIGN)
            try:
                written = os.pwrite(direct if aligned else self.fds[stem], data, at)
            except OSError as exc:
                if not aligned or exc.errno != errno.EINVAL:
                    raise
                os.close(direct)  # the filesystem opened it for direct I/O but refuses the writes
                self.direct[stem] = None
                continue
            data, at, address = data[written:], at + written, address + written

    def checkpoint(self, rows: int, stats: dict[str, dict]) -> None:
        """Rows [0, rows) and the statistics over them, durable: the data first, then one
        file naming both, replaced atomically."""
        for fd in self.fds.values():  # one descriptor per file: a sync is of the file, whichever opened it
            os.fdatasync(fd)
        flat = {f"{stem}/{key}": np.asarray(value) for stem, state in stats.items() for key, value in state.items()
                if value is not None}  # fmt: skip
        tmp = self.tmp_dir / f".{CHECKPOINT}"
        with tmp.open("wb") as handle:
            np.savez(handle, __rows__=np.int64(rows), __fingerprint__=np.str_(self.fingerprint), **flat)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.tmp_dir / CHECKPOINT)

    def commit(self, metadata: dict, extra_files: dict[str, dict[str, np.ndarray]] | None = None) -> Path:
        for fd in self.fds.values():
            os.fsync(fd)
        self._close()
        for name, arrays in (extra_files or {}).items():
            np.savez(self.tmp_dir / name, **arrays)
        (self.tmp_dir / CHECKPOINT).unlink(missing_ok=True)
        (self.tmp_dir / "metadata.json").write_text(json.dumps(metadata, indent=2))
        return promote(self.tmp_dir, self.final_dir)

    def _all_fds(self) -> list[int]:
        return [*self.fds.values(), *(fd for fd in self.direct.values() if fd is not None)]

    def _close(self) -> None:
        for fd in self._all_fds():
            os.close(fd)
        self.fds.clear()
        self.direct.clear()

    def close(self) -> None:
        """Stop writing and keep what a checkpoint made durable (a resume goes on from it)."""
        self._close()

    def discard(self) -> None:
        self._close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def checkpoint_problem(rows: int, n: int, saved: dict | None, stems: list[str], hidden: int, tokens_counted: int) -> str:
    """Why a checkpoint's row count and statistics cannot be what a run of `n` rows wrote
    over its first `rows` ("" when they can): rows within the request, every file's
    statistics complete, counting exactly the tokens those rows hold (`tokens_counted`),
    their parts adding up and their arrays the model's width. A checkpoint that fails is not
    gone on from: trusting it gave rows of zeros and statistics over rows never written."""
    if not 0 < rows <= n:
        return f"it names {rows:,} rows of a run of {n:,}"
    states = stats_from_checkpoint(saved or {}, stems)
    for stem in stems:
        state = states[stem]
        missing = [name for name in RunningStats.STATE if name not in state]
        if missing:
            return f"its statistics of {stem} lack {', '.join(missing)}"
        try:
            counts = {name: int(np.asarray(state[name]).item())
                      for name in ("tokens", "elements", "finite", "dim_count", "below", "nan", "inf")}  # fmt: skip
            sums = [float(np.asarray(state[name]).item()) for name in ("sum", "sum_abs", "sum_sq", "norm_sum", "threshold")]
            extremes = [float(np.asarray(state[name]).item()) for name in ("min", "max", "max_abs")]  # ±inf before any value
            hist = np.asarray(state["norm_hist"], dtype=np.int64)
            arrays = [np.asarray(state[name], dtype=np.float64) for name in ("dim_mean", "dim_m2") if state[name] is not None]
        except (TypeError, ValueError):
            return f"its statistics of {stem} are not numbers"
        if counts["tokens"] != tokens_counted:
            return f"its statistics of {stem} count {counts['tokens']:,} tokens where its {rows:,} rows hold {tokens_counted:,}"
        whole = (counts["elements"] == counts["tokens"] * hidden and 0 <= counts["finite"] <= counts["elements"]
                 and 0 <= counts["dim_count"] <= counts["tokens"] and hist.shape == (len(NORM_BIN_EDGES) + 1,)
                 and (hist >= 0).all() and int(hist.sum()) == counts["dim_count"] and all(np.isfinite(sums))
                 and 0 <= counts["below"] <= counts["finite"] and counts["nan"] >= 0 and counts["inf"] >= 0
                 and not any(np.isnan(extremes)))  # fmt: skip
        if whole and counts["dim_count"]:
            whole = len(arrays) == 2 and all(a.shape == (hidden,) and np.isfinite(a).all() for a in arrays)
        if not whole:
            return f"its statistics of {stem} do not add up"
    return ""


def stats_from_checkpoint(saved: dict[str, np.ndarray], stems: list[str]) -> dict[str, dict]:
    states: dict[str, dict] = {stem: {} for stem in stems}
    for key, value in saved.items():
        stem, name = key.split("/", 1)
        if stem in states:
            states[stem][name] = value
    for state in states.values():
        state.setdefault("dim_mean", None)
        state.setdefault("dim_m2", None)
    return states


def reserve(path: Path, size: int) -> None:
    """Extend the file to `size` bytes with its blocks allocated now (posix_fallocate):
    ENOSPC here, not mid-run."""
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
    fingerprint: str = "",
    checkpoint_seconds: float = 30.0,
    overlap_statistics: bool | None = None,
    on_notice: Callable[[str], None] | None = None,
) -> ExtractionResult:
    """Forward every batch once, capturing the requested hooks, writing and summarizing as
    it goes. A CUDA out-of-memory halves the batch and retries the same rows. `targets`,
    when the caller found them already, are the modules to hook.

    With a `fingerprint` (the request, model and data it names), the run is resumable: every
    `checkpoint_seconds` the rows so far are made durable with the statistics over them,
    and a run with the same fingerprint over a folder left by a stopped one goes on from
    its last checkpoint, once the checkpoint is found to hold what its rows must (else the
    run starts over and `on_notice` is told why). On the CPU the finished files are byte-identical to an
    uninterrupted run (the same batches, in the same order). Files that the run stopped
    with are kept for that; any other failure removes them. `overlap_statistics` chooses
    where the statistics run (see below; the default follows the device)."""
    import torch

    if len(tokens.ids) == 0:
        raise JobError("empty_dataset", "The dataset produced no samples at this sequence length.")
    # Bad layers or hooks are refused here, before any file exists.
    targets = targets or hook_targets(model, spec.layers, spec.hook_types)
    hidden = int(model.config.get_text_config().hidden_size if hasattr(model.config, "get_text_config") else model.config.hidden_size)
    n, seq_len = tokens.ids.shape
    storage = STORAGE_DTYPES[spec.dtype]
    stems = [file_stem(layer, hook) for layer in spec.layers for hook in spec.hook_types]
    shapes = {stem: (n, seq_len, hidden) for stem in stems}
    dtypes = {stem: np.dtype(storage) for stem in stems}
    shapes["tokens"], dtypes["tokens"] = (n, seq_len), np.dtype(np.int64)
    if tokens.mask is not None:
        shapes["attention_mask"], dtypes["attention_mask"] = (n, seq_len), np.dtype(bool)
    writer = ActivationWriter(final_dir, shapes, dtypes, fingerprint, tokens=tokens.ids)
    counted = tokens.statistics_mask()
    start = writer.resumed_rows
    if start:
        problem = checkpoint_problem(start, n, writer.resumed_stats, stems, hidden,
                                     start * seq_len if counted is None else int(counted[:start].sum()))  # fmt: skip
        if problem:
            try:
                writer.start_over(shapes, dtypes, problem)
            except BaseException:
                writer.discard()
                raise
            start = 0
    try:  # what fails here (a cancel seen by the notice's write) leaves no open file behind
        if writer.restart_reason and on_notice:
            on_notice(f"Started over: its checkpoint was not trusted ({writer.restart_reason}).")
        if start:
            states = stats_from_checkpoint(writer.resumed_stats or {}, stems)
            stats = {stem: RunningStats.from_state(states[stem]) for stem in stems}
        else:
            stats = {stem: RunningStats(spec.sparsity_threshold) for stem in stems}
    except BaseException:
        if start:
            writer.close()  # a trusted checkpoint stays for the next run
        else:
            writer.discard()
        raise
    device = next(model.parameters()).device
    torch_storage = torch.float16 if spec.dtype == "float16" else torch.float32
    started = time.perf_counter()
    batch_sizes: list[int] = []
    try:
        if not start:
            writer.write("tokens", 0, tokens.ids)
            if tokens.mask is not None:
                writer.write("attention_mask", 0, tokens.mask)
        # One set of capture buffers, reused batch after batch (copying into freshly
        # allocated tensors instead cost 4-6x as much, in page faults on new memory:
        # 72-87 ms vs 13-20 ms a batch of 90 files of 1,024 x 576). While batch k+1 runs,
        # the background thread writes batch k from the same buffers, file by file in
        # the order the forward pass fills them; a capture waits for its file's write
        # (`written`), which is long done by then: the first block's files are written
        # first and the pass takes seconds. A second set, as before, held one more batch
        # in memory (106 MB here, gigabytes for a 7B model) and cost 0.08 s to fault in
        # and 0.1 s to unmap a run on this VM.
        buffers: dict = {}
        written = {stem: threading.Event() for stem in stems}
        for event in written.values():
            event.set()
        rows = 0

        def on_capture(layer: int, hook: str, tensor) -> None:
            # A copy, always: some blocks add into their sublayer's output in place (Falcon).
            stem = file_stem(layer, hook)
            written[stem].wait()
            target = buffers[stem][:rows]
            target.copy_(tensor.detach().reshape(target.shape))

        # Where the statistics run. On the CPU the forward pass keeps every core busy, so
        # they run between batches, one file per core (the compiled pass releases the GIL):
        # on a background thread they would take a core from one of the forward's OpenMP
        # threads and stall the other at every barrier (measured on SmolLM2, 2 cores: 0.06 s
        # of CPU a batch cost the forward 0.16-0.25 s). On a GPU the cores are free while it
        # runs, and the statistics overlap with the next batch on the background thread.
        overlap = device.type != "cpu" if overlap_statistics is None else overlap_statistics

        def summarize_batch(rows: int, valid) -> None:
            list(cores.map(lambda stem: stats[stem].update(buffers[stem][:rows].numpy(), valid), stems))

        batch = spec.batch_size
        last_checkpoint = time.monotonic()
        with capture_activations(targets, on_capture), torch.no_grad(), _Background() as background, \
                ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()), thread_name_prefix="extraction-stats") as cores:  # fmt: skip
            while start < n:
                end = min(n, start + batch)
                rows = end - start
                if not buffers:
                    buffers = {stem: aligned_buffer((batch, seq_len, hidden), torch_storage) for stem in stems}
                ids = torch.from_numpy(tokens.ids[start:end]).to(device)
                mask = None if tokens.mask is None else torch.from_numpy(tokens.mask[start:end]).to(device)
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
                valid = None if counted is None else counted[start:end]

                due = bool(fingerprint) and end < n and time.monotonic() - last_checkpoint >= checkpoint_seconds
                if due:
                    last_checkpoint = time.monotonic()

                def store(start=start, rows=rows, valid=valid) -> None:
                    try:
                        for stem in stems:
                            values = buffers[stem][:rows].numpy()
                            writer.write(stem, start, values)
                            if overlap:
                                stats[stem].update(values, valid)
                            written[stem].set()
                    finally:  # a failed write surfaces at the next submit; no capture waits forever
                        for event in written.values():
                            event.set()

                # Batch k is written on one background thread (pwrite releases the GIL and,
                # direct, barely uses the CPU) while its statistics run here on the CPU, and
                # while batch k+1's forward runs; in batch order, so files and statistics are
                # exactly those of doing it all inline.
                background.wait()  # batch k-1's writes and checkpoint are done: the files can be marked pending
                for event in written.values():
                    event.clear()
                background.submit(store)
                if not overlap:
                    summarize_batch(rows, valid)
                if due:  # rows [0, end) and the statistics over exactly them, once both are done
                    background.submit(lambda end=end: writer.checkpoint(end, {stem: s.state() for stem, s in stats.items()}))
                batch_sizes.append(end - start)
                start = end
                if on_progress:
                    on_progress(start, n, time.perf_counter() - started)
            background.wait()
        # The buffers go while the files are committed (munmap releases the GIL): from the
        # last batch to the return, 0.105 s against 0.128 s with them unmapped on return.
        released = threading.Thread(target=buffers.clear, name="extraction-release")
        released.start()
        seconds = time.perf_counter() - started
        summary = {stem: s.result() for stem, s in stats.items()}
        metadata = {
            **metadata,
            "config": asdict(spec),
            "num_samples": n,
            "shapes": {stem: list(shape) for stem, shape in shapes.items()},
            "dtype": spec.dtype,
            "prepend_bos": spec.prepend_bos,
            "bos_token_id": tokens.bos_token_id,
            "separator": spec.separator if spec.tokenization == "packed" else None,
            "excluded_token_ids": list(tokens.excluded_ids),
            "statistics_exclude": list(STATISTICS_EXCLUDE),
            "statistics_note": "Figures, the norm scaling factor and .stats.npz leave out position 0 of every row (BOS, "
                               "or where there is none the attention sink), every BOS token (packed separators "
                               "included) and padding; the .npy files hold every position.",
            "hook_modules": targets.paths,
            "timings": {"seconds": round(seconds, 3), "samples_per_second": round(n / seconds, 3) if seconds else None},
            "statistics": summary,
        }  # fmt: skip
        if on_saving:
            on_saving()  # flushing the files to disk can take minutes for a large run
        output = writer.commit(metadata, {f"{stem}.stats.npz": stats[stem].dimension_arrays() for stem in stems})
        released.join()
    except BaseException as exc:
        if fingerprint and resumable(exc) and (writer.tmp_dir / CHECKPOINT).is_file():
            writer.close()
        else:
            writer.discard()
        raise
    return ExtractionResult(output, summary, n, seconds, n / seconds if seconds else math.inf, batch_sizes)


class _Background:
    """One background thread, one task in flight: `submit` waits for the previous task (and
    raises its error here), so at most one batch's captures wait in memory."""

    def __enter__(self):
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="extraction-store")
        self.pending = None
        return self

    def submit(self, task) -> None:
        self.wait()
        self.pending = self.executor.submit(task)

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self.wait()
            elif self.pending is not None:
                self.pending.exception()  # let it finish before the files are closed; its error is secondary
        finally:
            self.executor.shutdown(wait=True)



