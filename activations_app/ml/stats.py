"""Statistics of an activation file, accumulated batch by batch while it is written (the
file is never read back), over real tokens only (padding excluded)."""

from __future__ import annotations

import math

import numpy as np


class RunningStats:
    """mean |x|, mean per-token L2 norm, max |x|, min, max, std, share of |x| < threshold,
    NaN and Inf counts. Sums are float64, so the figures match numpy on the stored array."""

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

    def update(self, values: np.ndarray, valid: np.ndarray | None = None) -> None:
        """`values` [batch, seq, hidden] as stored; `valid` [batch, seq] marks real tokens."""
        x = values.reshape(-1, values.shape[-1])
        if valid is not None:
            x = x[valid.reshape(-1)]
        if x.size == 0:
            return
        x = x.astype(np.float64)
        finite = np.isfinite(x)
        self.nan += int(np.isnan(x).sum())
        self.inf += int(np.isinf(x).sum())
        if not finite.all():
            x = np.where(finite, x, 0.0)
        magnitude = np.abs(x)
        self.elements += x.size
        self.finite += int(finite.sum())
        self.sum += float(x.sum())
        self.sum_abs += float(magnitude.sum())
        self.sum_sq += float(np.square(x).sum())
        self.below += int((magnitude < self.threshold)[finite].sum())
        self.max_abs = max(self.max_abs, float(magnitude[finite].max(initial=-math.inf)))
        self.min = min(self.min, float(x[finite].min(initial=math.inf)))
        self.max = max(self.max, float(x[finite].max(initial=-math.inf)))
        self.norm_sum += float(np.sqrt(np.square(x).sum(axis=1)).sum())
        self.tokens += x.shape[0]

    def result(self) -> dict:
        n = self.finite
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
        }
