"""Activation extraction: run the model batch by batch with hooks, stream every captured
tensor into preallocated .npy files and into running statistics.

Memory is bounded by one batch whatever the dataset size: files are filled in place,
statistics are running sums. The parts live beside this file: `tokens` (the windows of
token ids), `writer` (the files, checkpoints and the move into place), `reuse` (files a
finished extraction already holds); here are the request (ExtractionSpec) and the run."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from mistudio.errors import JobError, resumable

from .hooks import HookTargets, StopForward, capture_activations, hook_targets
from .outliers import outlier_mask, outlier_report
from .reuse import ReusedFile, adopt
from .stats import RunningStats, statistics_over
from .tokens import STATISTICS_EXCLUDE, Tokens
from .writer import (CHECKPOINT, ActivationWriter, aligned_buffer, checkpoint_problem, file_stem, npy_header,
                     stats_from_checkpoint)

__all__ = ["ExtractionSpec", "ExtractionResult", "STORAGE_DTYPES", "file_stem", "run_extraction", "storage_bytes"]

STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}


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
    outlier_factor: int = 10  # a token is an outlier when its norm is above this many times the file's median
    outliers: str = "keep"  # "keep" (reported) or "exclude" (also left out of the statistics and the export)
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



def storage_bytes(num_samples: int, seq_len: int, hidden: int, dtype: str, files: int, with_mask: bool = False) -> int:
    """Exactly what the .npy files take: every activation file and its token norms (with
    their headers), tokens.npy and, in truncate mode, attention_mask.npy (metadata.json and
    the few-KB .stats.npz aside)."""
    itemsize = np.dtype(STORAGE_DTYPES[dtype]).itemsize
    header = len(npy_header((num_samples, seq_len, hidden), STORAGE_DTYPES[dtype]))
    norms = len(npy_header((num_samples, seq_len), np.float32)) + num_samples * seq_len * 4
    tokens = len(npy_header((num_samples, seq_len), np.int64)) + num_samples * seq_len * 8
    mask = len(npy_header((num_samples, seq_len), np.bool_)) + num_samples * seq_len if with_mask else 0
    return files * (header + num_samples * seq_len * hidden * itemsize + norms) + tokens + mask



@dataclass
class ExtractionResult:
    output_dir: Path
    statistics: dict[str, dict]
    num_samples: int
    seconds: float
    samples_per_second: float
    batch_sizes: list[int] = field(default_factory=list)
    reused: dict[str, str] = field(default_factory=dict)  # file stem -> the extraction it was taken from


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
    reused: dict[str, ReusedFile] | None = None,
    decode: Callable[[int], str] | None = None,
) -> ExtractionResult:
    """Forward every batch once, capturing the requested hooks, writing and summarizing as
    it goes. A CUDA out-of-memory halves the batch and retries the same rows. `targets`,
    when the caller found them already, are the modules to hook.

    `reused`: requested files a finished extraction already holds for these very rows (see
    `reuse`); they are taken from it, only the rest is computed, and the forward pass stops
    after the deepest block still needed (`model` may be None when every file is reused).

    Every file gets `{stem}.norms.npy`, each token's L2 norm (float32, NaN where the
    statistics do not count it), and an outlier report (see `outliers`; `decode` gives a
    token id's text for it); with `spec.outliers == "exclude"` the statistics leave the
    outliers out too.

    With a `fingerprint` (the request, model and data it names), the run is resumable: every
    `checkpoint_seconds` the rows so far are made durable with the statistics over them,
    and a run with the same fingerprint over a folder left by a stopped one goes on from
    its last checkpoint, once the checkpoint is found to hold what its rows must (else the
    run starts over and `on_notice` is told why). On the CPU the finished files are
    byte-identical to an uninterrupted run (the same batches, in the same order). Files that
    the run stopped with are kept for that; any other failure removes them.
    `overlap_statistics` chooses where the statistics run (see _ForwardPass; the default
    follows the device)."""
    if len(tokens.ids) == 0:
        raise JobError("empty_dataset", "The dataset produced no samples at this sequence length.")
    reused = reused or {}
    requested = [file_stem(layer, hook) for layer in spec.layers for hook in spec.hook_types]
    missing = [stem for stem in requested if stem not in reused]
    if missing or not reused:
        # Bad layers or hooks are refused here, before any file exists.
        targets = targets or hook_targets(model, spec.layers, spec.hook_types, only=set(missing) if reused else None)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        hidden = int(config.hidden_size)
    else:
        targets, hidden = None, reused[requested[0]].shape[2]
    computed = [file_stem(layer, hook) for layer, hook, *_ in targets.captures] if targets else []
    n, seq_len = tokens.ids.shape
    shapes = {stem: (n, seq_len, hidden) for stem in computed}
    dtypes = {stem: np.dtype(STORAGE_DTYPES[spec.dtype]) for stem in computed}
    for stem in computed:
        shapes[f"{stem}.norms"], dtypes[f"{stem}.norms"] = (n, seq_len), np.dtype(np.float32)
    shapes["tokens"], dtypes["tokens"] = (n, seq_len), np.dtype(np.int64)
    if tokens.mask is not None:
        shapes["attention_mask"], dtypes["attention_mask"] = (n, seq_len), np.dtype(bool)
    writer = ActivationWriter(final_dir, shapes, dtypes, fingerprint, tokens=tokens.ids)
    counted = tokens.statistics_mask()  # the positions every figure below counts, built once
    start, stats = _resume_or_start(writer, shapes, dtypes, computed, hidden, tokens, counted, spec, on_notice)
    exclude = statistics_exclude(spec)
    started = time.perf_counter()
    adopted: list[Path] = []
    try:
        if not start:
            writer.write("tokens", 0, tokens.ids)
            if tokens.mask is not None:
                writer.write("attention_mask", 0, tokens.mask)
        forward = _ForwardPass(model, targets, tokens, counted, spec, writer, stats, hidden, checkpoint_seconds if fingerprint else None,
                               overlap_statistics) if computed else None  # fmt: skip
        if forward:
            forward.run(start, on_progress, started)
        elif on_progress:
            on_progress(n, n, time.perf_counter() - started)
        figures, dimensions = {}, {stem: stats[stem].dimension_arrays() for stem in computed}
        for stem in requested:
            if stem in reused:
                adopted += [writer.tmp_dir / f"{stem}{suffix}" for suffix in (".npy", ".stats.npz", ".norms.npy")]
                figures[stem] = adopt(reused[stem], writer.tmp_dir, tokens, counted, spec, exclude)
            else:
                figures[stem] = stats[stem].result()
        for stem in requested:
            norms = np.load(writer.tmp_dir / f"{stem}.norms.npy", mmap_mode="r")
            above, median = outlier_mask(norms, spec.outlier_factor)  # once: the report and the exclusion share it
            if spec.outliers == "exclude":  # the statistics again, without them
                again = statistics_over(np.load(writer.tmp_dir / f"{stem}.npy", mmap_mode="r"), counted & ~above,
                                        spec.sparsity_threshold, spec.batch_size)  # fmt: skip
                figures[stem], dimensions[stem] = again.result(), again.dimension_arrays()
            figures[stem]["outliers"] = outlier_report(norms, above, median, spec.outlier_factor, tokens.ids, decode)
            del norms
        seconds = time.perf_counter() - started
        metadata = _metadata(metadata, spec, tokens, hidden, figures, reused, targets, seconds, computed, exclude)
        if on_saving:
            on_saving()  # flushing the files to disk can take minutes for a large run
        for stem in dimensions:
            (writer.tmp_dir / f"{stem}.stats.npz").unlink(missing_ok=True)  # a reused one may be a link
        output = writer.commit(metadata, {f"{stem}.stats.npz": arrays for stem, arrays in dimensions.items()})
        if forward:
            forward.released.join()
    except BaseException as exc:
        for path in adopted:  # another extraction's files: never left where a resumed run would write
            path.unlink(missing_ok=True)
        if fingerprint and resumable(exc) and (writer.tmp_dir / CHECKPOINT).is_file():
            writer.close()
        else:
            writer.discard()
        raise
    rate = n / seconds if computed and seconds else 0.0  # a run that computed nothing says nothing of the model's speed
    return ExtractionResult(output, figures, n, seconds, rate, forward.batch_sizes if forward else [],
                            {stem: file.source_id for stem, file in reused.items()})  # fmt: skip


def _resume_or_start(writer, shapes, dtypes, stems, hidden, tokens, counted, spec, on_notice) -> tuple[int, dict[str, RunningStats]]:
    """The row to start from and the running statistics so far: a checkpoint the writer
    reopened is gone on from once it holds what its rows must (else its files go and the
    run starts over, saying why)."""
    start = writer.resumed_rows
    if start:
        problem = checkpoint_problem(start, len(tokens.ids), writer.resumed_stats, stems, hidden, int(counted[:start].sum()))
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
            return start, {stem: RunningStats.from_state(states[stem]) for stem in stems}
        return 0, {stem: RunningStats(spec.sparsity_threshold) for stem in stems}
    except BaseException:
        if start:
            writer.close()  # a trusted checkpoint stays for the next run
        else:
            writer.discard()
        raise


def statistics_exclude(spec: ExtractionSpec) -> list[str]:
    """What the request's statistics leave out (metadata.json records it; a reused file's
    statistics are taken as they are only when its extraction left out the same)."""
    extra = [f"outliers (norm above {spec.outlier_factor}x the file's median)"] if spec.outliers == "exclude" else []
    return [*STATISTICS_EXCLUDE, *extra]


def _metadata(base, spec, tokens, hidden, figures, reused, targets, seconds, computed, exclude) -> dict:
    """metadata.json: the request, the tokens' conventions, where each file came from (the
    hooked module; computed here or reused from which extraction) and the statistics."""
    n = len(tokens.ids)
    modules = {stem: file.hook_module for stem, file in reused.items()}
    modules.update(targets.paths if targets else {})
    shapes = {stem: [n, spec.seq_len, hidden] for stem in figures}
    shapes["tokens"] = [n, spec.seq_len]
    if tokens.mask is not None:
        shapes["attention_mask"] = [n, spec.seq_len]
    return {
        **base,
        "config": asdict(spec),
        "num_samples": n,
        "shapes": shapes,
        "dtype": spec.dtype,
        "prepend_bos": spec.prepend_bos,
        "bos_token_id": tokens.bos_token_id,
        "separator": spec.separator if spec.tokenization == "packed" else None,
        "excluded_token_ids": list(tokens.excluded_ids),
        "statistics_exclude": exclude,
        "statistics_note": "Figures, the norm scaling factor and .stats.npz leave out position 0 of every row (BOS, "
                           "or where there is none the attention sink), every BOS token (packed separators "
                           "included) and padding" + (", and each file's outlier tokens" if spec.outliers == "exclude" else "")
                           + "; the .npy files hold every position. {stem}.norms.npy holds each token's L2 norm "
                           "(NaN where not counted).",
        "outliers": {"factor": spec.outlier_factor, "rule": spec.outliers,
                     "note": f"Outliers: counted tokens whose norm is above {spec.outlier_factor}x the file's median norm; "
                             + ("left out of the statistics and of the export's rows." if spec.outliers == "exclude"
                                else "reported only (statistics and export keep them).")},
        "hook_modules": {stem: modules.get(stem) for stem in figures},
        "computed": computed,
        "reused": {stem: file.source_id for stem, file in reused.items()},
        "timings": {"seconds": round(seconds, 3), "samples_per_second": round(n / seconds, 3) if seconds and computed else None},
        "statistics": figures,
    }  # fmt: skip


class _ForwardPass:
    """The batches through the model: each block's captures copied into one set of buffers,
    reused batch after batch, written by a background thread while the next batch runs, and
    summarized into the running statistics in batch order.

    Buffers: copying into freshly allocated tensors instead cost 4-6x as much, in page
    faults on new memory (72-87 ms vs 13-20 ms a batch of 90 files of 1,024 x 576). While
    batch k+1 runs, the background thread writes batch k from the same buffers, file by
    file in the order the forward pass fills them; a capture waits for its file's write
    (`written`), which is long done by then: the first block's files are written first and
    the pass takes seconds. A second set, as before, held one more batch in memory (106 MB
    here, gigabytes for a 7B model) and cost 0.08 s to fault in and 0.1 s to unmap a run.

    Statistics: on the CPU the forward pass keeps every core busy, so they run between
    batches, one file per core (the compiled pass releases the GIL): on a background thread
    they would take a core from one of the forward's OpenMP threads and stall the other at
    every barrier (measured on SmolLM2, 2 cores: 0.06 s of CPU a batch cost the forward
    0.16-0.25 s). On a GPU the cores are free while it runs, and the statistics overlap
    with the next batch on the background thread."""

    def __init__(self, model, targets, tokens, counted, spec, writer, stats, hidden, checkpoint_every, overlap) -> None:
        import torch

        self.model, self.targets, self.tokens, self.spec, self.writer, self.stats = model, targets, tokens, spec, writer, stats
        self.stems, self.hidden = list(stats), hidden
        self.counted = counted
        self.device = next(model.parameters()).device
        self.storage = torch.float16 if spec.dtype == "float16" else torch.float32
        self.checkpoint_every = checkpoint_every  # seconds; None: no checkpoints (not resumable)
        self.overlap = self.device.type != "cpu" if overlap is None else overlap
        self.buffers: dict = {}
        self.written = {stem: threading.Event() for stem in self.stems}
        for event in self.written.values():
            event.set()
        self.rows = 0  # rows of the batch in the buffers
        self.batch_sizes: list[int] = []
        self.released: threading.Thread | None = None

    def capture(self, layer: int, hook: str, tensor) -> None:
        # A copy, always: some blocks add into their sublayer's output in place (Falcon).
        stem = file_stem(layer, hook)
        self.written[stem].wait()
        target = self.buffers[stem][: self.rows]
        target.copy_(tensor.detach().reshape(target.shape))

    def store(self, start: int, rows: int, valid) -> None:
        """Batch rows [start, start + rows) from the buffers into the files (and, overlapped,
        into the statistics). Runs on the background thread."""
        try:
            for stem in self.stems:
                values = self.buffers[stem][:rows].numpy()
                self.writer.write(stem, start, values)
                if self.overlap:
                    self.stats[stem].update(values, valid)
                    self.writer.write(f"{stem}.norms", start, self.stats[stem].last_norms(valid.shape))
                self.written[stem].set()
        finally:  # a failed write surfaces at the next submit; no capture waits forever
            for event in self.written.values():
                event.set()

    def summarize(self, cores, start: int, rows: int, valid) -> None:
        """The batch's statistics, one file per core, and each token's norm (which the pass
        computed) into its norms file."""

        def one(stem: str) -> None:
            self.stats[stem].update(self.buffers[stem][:rows].numpy(), valid)
            self.writer.write(f"{stem}.norms", start, self.stats[stem].last_norms(valid.shape))

        list(cores.map(one, self.stems))

    def run(self, start: int, on_progress, started: float) -> None:
        import torch

        n, seq_len = self.tokens.ids.shape
        batch = self.spec.batch_size
        last_checkpoint = time.monotonic()
        with capture_activations(self.targets, self.capture), torch.no_grad(), _Background() as background, \
                ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()), thread_name_prefix="extraction-stats") as cores:  # fmt: skip
            while start < n:
                end = min(n, start + batch)
                self.rows = end - start
                if not self.buffers:
                    self.buffers = {stem: aligned_buffer((batch, seq_len, self.hidden), self.storage) for stem in self.stems}
                ids = torch.from_numpy(self.tokens.ids[start:end]).to(self.device)
                mask = None if self.tokens.mask is None else torch.from_numpy(self.tokens.mask[start:end]).to(self.device)
                try:
                    self.model(input_ids=ids, attention_mask=mask, use_cache=False)
                except StopForward:
                    pass
                except torch.cuda.OutOfMemoryError:
                    if batch == 1:
                        raise JobError("out_of_memory", "Out of GPU memory even with a batch of 1.") from None
                    batch = max(1, batch // 2)
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    continue
                valid = self.counted[start:end]
                due = self.checkpoint_every is not None and end < n and time.monotonic() - last_checkpoint >= self.checkpoint_every
                if due:
                    last_checkpoint = time.monotonic()
                # Batch k is written on one background thread (pwrite releases the GIL and,
                # direct, barely uses the CPU) while its statistics run here on the CPU, and
                # while batch k+1's forward runs; in batch order, so files and statistics are
                # exactly those of doing it all inline.
                background.wait()  # batch k-1's writes and checkpoint are done: the files can be marked pending
                for event in self.written.values():
                    event.clear()
                background.submit(lambda start=start, rows=self.rows, valid=valid: self.store(start, rows, valid))
                if not self.overlap:
                    self.summarize(cores, start, self.rows, valid)
                if due:  # rows [0, end) and the statistics over exactly them, once both are done
                    background.submit(lambda end=end: self.writer.checkpoint(end, {stem: s.state() for stem, s in self.stats.items()}))
                self.batch_sizes.append(end - start)
                start = end
                if on_progress:
                    on_progress(start, n, time.perf_counter() - started)
            background.wait()
        # The buffers go while the files are committed (munmap releases the GIL): from the
        # last batch to the return, 0.105 s against 0.128 s with them unmapped on return.
        self.released = threading.Thread(target=self.buffers.clear, name="extraction-release")
        self.released.start()


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
