"""Outlier tokens, per file: tokens whose activation norm is above k times the median norm
of the file's counted tokens (the positions the statistics count: never position 0, BOS or
padding). In SmolLM2 such tokens are ordinary words with residual norms above 1,000 where
the median is about 170; a handful of them spike an SAE's training loss. The report says
how many, their share and the largest ten with their place and text; with the `exclude`
rule they are also left out of the statistics (and the norm scaling factor) and the export
leaves out the rows that hold them."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

OUTLIER_RULES = {"keep": "keep (report them only)", "exclude": "exclude (from the statistics and the export)"}
LARGEST = 10


def outlier_mask(norms: np.ndarray, factor: float) -> tuple[np.ndarray, float | None]:
    """Which tokens are outliers ([rows, seq] bool), and the median they are measured
    against (None when no token counts). `norms`: NaN where a token is not counted."""
    counted = norms[~np.isnan(norms)]
    if counted.size == 0:
        return np.zeros(norms.shape, dtype=bool), None
    median = float(np.median(counted))
    with np.errstate(invalid="ignore"):
        return np.asarray(norms > factor * median), median


def outlier_report(norms: np.ndarray, above: np.ndarray, median: float | None, factor: float, ids: np.ndarray,
                   decode: Callable[[int], str] | None = None) -> dict:  # fmt: skip
    """How many counted tokens have a norm above `factor` x the median (`above` and `median`
    as outlier_mask found them), their share, and the LARGEST largest tokens (outliers or
    not) with their row, position, token and norm."""
    counted = int((~np.isnan(norms)).sum())
    flat = np.where(np.isnan(norms), -np.inf, norms).reshape(-1)
    k = min(LARGEST, flat.size)
    candidates = np.argpartition(flat, flat.size - k)[flat.size - k :] if k else np.zeros(0, dtype=np.int64)
    top = [int(i) for i in sorted(candidates, key=lambda i: -flat[i]) if np.isfinite(flat[i])]
    seq = norms.shape[1]
    largest = []
    for index in top:
        row, position = divmod(index, seq)
        token = int(ids[row, position])
        largest.append({"row": row, "position": position, "token_id": token, "token": decode(token) if decode else None,
                        "norm": float(flat[index]), "times_median": float(flat[index] / median) if median else None})  # fmt: skip
    count = int(above.sum())
    return {"factor": factor, "median_norm": median, "threshold": factor * median if median is not None else None,
            "count": count, "counted_tokens": counted, "share": count / counted if counted else 0.0, "largest": largest}  # fmt: skip
