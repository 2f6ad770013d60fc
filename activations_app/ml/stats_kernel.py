"""One compiled pass over a batch of stored activations for RunningStats: per-dimension
sums, sums of squares, minima and maxima, per-token L2 norms, the sum of magnitudes and the
count below the sparsity threshold, all in float64.

Why compiled: the same figures as a dozen numpy/torch passes cost 150–220 ms per batch of
90 files (1,024 × 576) on one core, and torch's kernels, called from the background thread
that does this work, start their own OpenMP team beside the forward pass's (measured: 0.9 s
of CPU per batch). This pass takes about 30 ms on one core, holds the GIL for none of it,
and starts no threads. float16 values are decoded from their bits exactly (numba has no
float16 type); the loops vectorize. Imported only by the code that runs an extraction
(numba's import and its on-disk cache of the compiled pass stay out of the web process)."""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import types
from numba.extending import overload

# reassoc lets the row's sums vectorize; NaN and Inf keep their meaning (no nnan/ninf): a
# non-finite value makes the batch's total non-finite, and the caller takes the careful path.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


def _widen(source, bits, row):
    """One stored row into float64 `row` (whose memory `bits` is)."""


@overload(_widen, fastmath=_FASTMATH)
def _widen_impl(source, bits, row):
    if source.dtype == types.uint16:  # float16, as its bits

        def widen_half(source, bits, row):
            # Normal numbers: the exponent rebased from 15 to 1023, the mantissa shifted up;
            # Inf/NaN (exponent 31) to exponent 2047; the sign bit moved to bit 63.
            for j in range(source.shape[0]):
                h = np.uint64(source[j])
                magnitude = h & np.uint64(0x7FFF)
                wide = (magnitude << np.uint64(42)) + np.uint64(1008 << 52)
                if magnitude >= np.uint64(0x7C00):
                    wide += np.uint64(1008 << 52)
                bits[j] = wide | ((h & np.uint64(0x8000)) << np.uint64(48))
            # Subnormals (exponent 0) came out as 2^-15 · (1 + m/1024): the value is m · 2^-24.
            for j in range(source.shape[0]):
                if (source[j] & 0x7C00) == 0:
                    row[j] = (row[j] - math.copysign(2.0**-15, row[j])) * 2.0

        return widen_half

    def widen_float(source, bits, row):
        for j in range(source.shape[0]):
            row[j] = source[j]

    return widen_float


@numba.njit(nogil=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
def summarize(x, keep, threshold, dim_sum, dim_sq, dim_lo, dim_hi, norms):
    """Over the rows of `x` ([tokens, hidden]: float16 as uint16, or float32) that `keep`
    marks: adds into dim_sum/dim_sq (zeros) and dim_lo/dim_hi (±inf), writes each kept
    row's L2 norm into `norms` in order. Returns (kept rows, sum of |x|, count of |x| <
    threshold, whether every kept value was finite; when not, the other figures are void)."""
    hidden = x.shape[1]
    bits = np.empty(hidden, np.uint64)
    row = bits.view(np.float64)
    sum_abs = 0.0
    below = 0
    kept = 0
    total = 0.0
    for i in range(x.shape[0]):
        if not keep[i]:
            continue
        _widen(x[i], bits, row)
        squares = 0.0
        for j in range(hidden):
            v = row[j]
            s = v * v
            dim_sum[j] += v
            dim_sq[j] += s
            squares += s
            magnitude = abs(v)
            sum_abs += magnitude
            below += np.int64(magnitude < threshold)
            dim_lo[j] = min(dim_lo[j], v)
            dim_hi[j] = max(dim_hi[j], v)
        norms[kept] = math.sqrt(squares)
        total += squares
        kept += 1
    return kept, sum_abs, below, math.isfinite(total)
