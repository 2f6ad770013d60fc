"""Statistics of an activation file, accumulated batch by batch while it is written (the
file is never read back), over real tokens only (padding excluded)."""

from __future__ import annotations

import math

import numpy as np

# Per-token L2 norms are counted in fixed log-spaced bins, the same for every file and run,
# so histograms compare across layers and models: 10^-3 … 10^5 in 64 bins, plus one bin
# below and one above.
NORM_BIN_EDGES = np.logspace(-3, 5, 65)


class RunningStats:
    """mean |x|, mean per-token L2 norm, max |x|, min, max, std, share of |x| < threshold,
    NaN and Inf counts, over the values exactly as stored.

    Everything accumulates in float64 over the values exactly as stored (float16 widened
    exactly), in one compiled pass per batch (stats_kernel), so the figures match numpy in
    float64 on the loaded array."""

    def __init__(self, sparsity_threshold: float = 0.01) -> None:
        self.threshold = sparsity_threshold
        self.elements = 0
        self.finite = 0
        self.sum = 0.0
        self.sum_abs = 0.0
        self.sum_sq = 0.0
        self.below = 0
        self.max_abs = -math.inf
        self.min = math.inf
        self.max = -math.inf
        self.nan = 0
        self.inf = 0
        self.tokens = 0
        self.norm_sum = 0.0
        # Per dimension, merged across batches (Chan et al.): count, mean and the sum of
        # squared deviations, in float64.
        self.dim_count = 0
        self.dim_mean: np.ndarray | None = None
        self.dim_m2: np.ndarray | None = None
        self.norm_hist = np.zeros(len(NORM_BIN_EDGES) + 1, dtype=np.int64)  # [below, 64 bins…, above]
        self._scratch: tuple | None = None  # the compiled pass's per-batch arrays, reused (not state)
        self._last: tuple = (np.zeros(0, dtype=bool), 0)  # the last update's kept tokens (not state)

    STATE = ("threshold", "elements", "finite", "sum", "sum_abs", "sum_sq", "below", "max_abs", "min", "max", "nan",
             "inf", "tokens", "norm_sum", "dim_count", "dim_mean", "dim_m2", "norm_hist")  # fmt: skip

    def state(self) -> dict:
        """Everything needed to go on after a restart (a resumed extraction). The arrays are
        the live ones, which the next update changes in place: read (or save) them before it."""
        return {name: getattr(self, name) for name in self.STATE}

    @classmethod
    def from_state(cls, state: dict) -> RunningStats:
        stats = cls(float(state["threshold"]))
        for name in cls.STATE:
            value = state[name]
            if isinstance(value, np.ndarray) and value.ndim == 0:
                value = value.item()
            setattr(stats, name, value)
        if stats.dim_mean is not None and np.ndim(stats.dim_mean) == 0:
            stats.dim_mean = stats.dim_m2 = None
        if stats.dim_mean is not None:  # updated in place from here on: own, writable, contiguous copies
            stats.dim_mean, stats.dim_m2 = (np.array(a, dtype=np.float64, order="C") for a in (stats.dim_mean, stats.dim_m2))
        stats.norm_hist = np.array(stats.norm_hist, dtype=np.int64, order="C")
        return stats

    def _dimensions(self, hidden: int) -> None:
        """The running per-dimension arrays, zeros before the first counted token."""
        if self.dim_mean is None:
            self.dim_count, self.dim_mean, self.dim_m2 = 0, np.zeros(hidden), np.zeros(hidden)

    def dimension_arrays(self) -> dict[str, np.ndarray]:
        """What `layer_{i}_{hook}.stats.npz` holds: per-dimension mean and (population)
        variance over the counted tokens, float64, and that count."""
        if not self.dim_count:
            return {"mean": np.zeros(0), "var": np.zeros(0), "count": np.int64(0)}
        return {"mean": self.dim_mean, "var": self.dim_m2 / self.dim_count, "count": np.int64(self.dim_count)}

    def update(self, values: np.ndarray, valid: np.ndarray | None = None) -> None:
        """`values`: [batch, seq, hidden] (or [tokens, hidden]) in the storage dtype, float16
        or float32, as written to the file; `valid`: bool [batch, seq] marking the tokens
        that count, or None when all do. The per-dimension arrays are updated in place."""
        from . import stats_kernel

        x = values.reshape(-1, values.shape[-1])
        keep = np.ones(x.shape[0], dtype=bool) if valid is None else np.ascontiguousarray(valid).reshape(-1)
        source = x.view(np.uint16) if x.dtype == np.float16 else x.astype(np.float32, copy=False)
        hidden = x.shape[1]
        self._dimensions(hidden)
        if self._scratch is None or len(self._scratch[0]) != hidden or len(self._scratch[4]) < x.shape[0]:
            self._scratch = (*(np.empty(hidden) for _ in range(4)), np.empty(x.shape[0]))
        kept, sum_abs, below, finite, total, squares, low, high, norms, self.dim_count = stats_kernel.update(
            source, keep, self.threshold, *self._scratch, self.dim_count, self.dim_mean, self.dim_m2, self.norm_hist,
            NORM_BIN_EDGES)  # fmt: skip
        self._last = (keep, kept)
        if not kept:
            return
        if not finite:
            self._update_nonfinite(x[keep].astype(np.float64))
            return
        self.elements += kept * hidden
        self.finite += kept * hidden
        self.sum += total
        self.sum_abs += sum_abs
        self.sum_sq += squares
        self.below += below
        self.min = min(self.min, low)
        self.max = max(self.max, high)
        self.max_abs = max(self.max_abs, -self.min, self.max)
        self.norm_sum += norms
        self.tokens += kept

    def last_norms(self, shape: tuple[int, ...]) -> np.ndarray:
        """The L2 norm of every token of the last update, float32 in `shape` (its [batch,
        seq]), NaN where the statistics did not count the token: the pass computed them."""
        keep, kept = self._last
        out = np.full(int(np.prod(shape)), np.nan, dtype=np.float32)
        out[keep] = self._scratch[4][:kept]
        return out.reshape(shape)

    def _update_nonfinite(self, x: np.ndarray) -> None:
        """The same figures when some values are NaN or Inf (`x`: the counted tokens, float64):
        those are counted, and left out of every other figure (they count as elements, not
        as finite values)."""
        finite = np.isfinite(x)
        self.nan += int(np.isnan(x).sum())
        self.inf += int(np.isinf(x).sum())
        x = np.where(finite, x, 0.0)
        magnitude = np.abs(x)
        square = x * x
        count = int(finite.sum())
        self.elements += x.size
        self.finite += count
        self.sum += float(x.sum())
        self.sum_abs += float(magnitude.sum())
        self.sum_sq += float(square.sum())
        self.below += int(((magnitude < self.threshold) & finite).sum())
        if count:
            finite_values = x[finite]
            self.max_abs = max(self.max_abs, float(np.abs(finite_values).max()))
            self.min = min(self.min, float(finite_values.min()))
            self.max = max(self.max, float(finite_values.max()))
        self.norm_sum += float(np.sqrt(square.sum(axis=1)).sum())
        self.tokens += x.shape[0]
        # Per-dimension figures and the norm histogram: over the tokens with no NaN or Inf.
        kept = finite.all(axis=1)
        if kept.any():
            from .stats_kernel import merge_dimensions

            whole = square[kept]
            self._dimensions(x.shape[1])
            self.dim_count = merge_dimensions(int(kept.sum()), x[kept].sum(axis=0), whole.sum(axis=0), np.sqrt(whole.sum(axis=1)),
                                              self.dim_count, self.dim_mean, self.dim_m2, self.norm_hist, NORM_BIN_EDGES)  # fmt: skip

    def result(self) -> dict:
        n = self.finite
        hidden = len(self.dim_mean) if self.dim_mean is not None else 0
        mean_norm = self.norm_sum / self.tokens if self.tokens else None
        mean = self.sum / n if n else None
        variance = max(0.0, self.sum_sq / n - mean * mean) if n else None
        return {
            "mean_magnitude": self.sum_abs / n if n else None,
            "mean_l2_norm": self.norm_sum / self.tokens if self.tokens else None,
            "max_magnitude": self.max_abs if n else None,
            "min": self.min if n else None,
            "max": self.max if n else None,
            "mean": mean,
            "std": math.sqrt(variance) if variance is not None else None,
            "sparsity_percent": 100.0 * self.below / self.elements if self.elements else None,
            "sparsity_threshold": self.threshold,
            "nan_count": self.nan,
            "inf_count": self.inf,
            "elements": self.elements,
            "tokens": self.tokens,
            # SAELens' normalisation: multiply activations by it so E‖x‖₂ = √d.
            "norm_scaling_factor": math.sqrt(hidden) / mean_norm if hidden and mean_norm else None,
            "norm_histogram": {"edges": "logspace(-3, 5, 65)", "below": int(self.norm_hist[0]),
                               "counts": self.norm_hist[1:-1].tolist(), "above": int(self.norm_hist[-1])},
        }


def warm() -> None:
    """Load (or compile, once per machine and CPU) the compiled pass for both storage dtypes
    now: about 0.4 s with numba's import, better spent in a job's loading phase than at its
    first batch, where it would stall the progress and the ETA."""
    for dtype in (np.float16, np.float32):  # the storage dtypes
        RunningStats().update(np.zeros((1, 1), dtype=dtype))


def statistics_over(values: np.ndarray, counted: np.ndarray, threshold: float, batch: int,
                    norms: np.ndarray | None = None) -> RunningStats:  # fmt: skip
    """RunningStats over the stored `values` ([rows, seq, hidden], a memory map read `batch`
    rows at a time, the run's own batches: the same sums in the same order) at the positions
    `counted` marks; each token's norm into `norms` ([rows, seq], NaN where not counted)
    when given."""
    stats = RunningStats(threshold)
    for start in range(0, len(values), batch):
        chunk = np.ascontiguousarray(values[start : start + batch])
        stats.update(chunk, counted[start : start + batch])
        if norms is not None:
            norms[start : start + len(chunk)] = stats.last_norms(chunk.shape[:2])
    return stats
