"""One compiled pass over a batch of stored activations for RunningStats: per-dimension
sums, sums of squares, minima and maxima, per-token L2 norms, the sum of magnitudes and the
count below the sparsity threshold, all in float64.

Why compiled: the same figures as a dozen numpy/torch passes cost 150–220 ms per batch of
90 files (1,024 × 576) on one core, and torch's kernels, called from a second thread, start
their own OpenMP team beside the forward pass's (measured: 0.9 s of CPU per batch). This
pass takes about 25 ms on one core, holds the GIL for none of it and starts no threads.
numba has no float16 type: float16 values come in as their bits and are widened exactly,
with the CPU's conversion instruction where it has one (x86's F16C, every AArch64), else
from the bits with integer arithmetic (a third slower). Imported only by the code that runs
an extraction: numba's import and its on-disk cache of the compiled pass stay out of the
web process."""

from __future__ import annotations

import math
import platform

import numba
import numpy as np
from llvmlite import binding, ir
from numba import types
from numba.extending import intrinsic, overload

# reassoc lets the row's sums vectorize; NaN and Inf keep their meaning (no nnan/ninf): a
# non-finite value makes the batch's total non-finite, and the caller takes the careful path.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


def _has_half_instruction() -> bool:
    """Whether LLVM widens float16 with an instruction on this CPU; without one it would
    call a runtime-library routine that numba's JIT does not link."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    try:
        return bool(binding.get_host_cpu_features().get("f16c"))
    except RuntimeError:
        return False


HALF_INSTRUCTION = _has_half_instruction()


@intrinsic
def _fpext_half(typingctx, bits):
    """float16 bits to float64: LLVM's own conversion (vcvtph2ps with F16C, vectorized)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.DoubleType())

    return types.float64(types.uint16), codegen


@intrinsic
def _as_double(typingctx, bits):
    """The float64 whose bits these are."""
    if bits != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.uint64), codegen


@numba.njit(inline="always")
def half_by_instruction(bits):
    return _fpext_half(bits)


@numba.njit(inline="always")
def half_by_arithmetic(bits):
    """Normal numbers: the exponent rebased from 15 to 1023 and the mantissa shifted up;
    Inf/NaN (exponent 31) to exponent 2047; subnormals (exponent 0) are m · 2^-24."""
    h = np.uint64(bits)
    magnitude = h & np.uint64(0x7FFF)
    wide = (magnitude << np.uint64(42)) + np.uint64(1008 << 52)
    if magnitude >= np.uint64(0x7C00):
        wide += np.uint64(1008 << 52)
    value = _as_double(wide | ((h & np.uint64(0x8000)) << np.uint64(48)))
    if magnitude < np.uint64(0x400):
        value = np.float64(np.int64(magnitude)) * 2.0**-24 * (1.0 - 2.0 * np.float64(h >> np.uint64(15)))
    return value


def _widen(value):
    """One stored value (float16 as its bits, or float32) as float64."""


@overload(_widen, inline="always")
def _widen_impl(value):
    if value == types.uint16:
        widen_half = half_by_instruction if HALF_INSTRUCTION else half_by_arithmetic
        return lambda value: widen_half(value)
    return lambda value: np.float64(value)


@numba.njit(nogil=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
def summarize(x, keep, threshold, dim_sum, dim_sq, dim_lo, dim_hi, norms):
    """Over the rows of `x` ([tokens, hidden]: float16 as uint16, or float32) that `keep`
    marks: adds into dim_sum/dim_sq (zeros) and dim_lo/dim_hi (±inf), writes each kept
    row's L2 norm into `norms` in order. Returns (kept rows, sum of |x|, count of |x| <
    threshold, whether every kept value was finite; when not, the other figures are void)."""
    hidden = x.shape[1]
    sum_abs = 0.0
    below = 0
    kept = 0
    total = 0.0
    for i in range(x.shape[0]):
        if not keep[i]:
            continue
        squares = 0.0
        for j in range(hidden):
            v = _widen(x[i, j])
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


@numba.njit(nogil=True, cache=True, error_model="numpy")
def merge_dimensions(n, dim_sum, dim_sq, norms, count, dim_mean, dim_m2, hist, edges):
    """One batch of `n` tokens into the running per-dimension figures, in place: its mean
    and squared deviations from its sums, merged into `dim_mean`/`dim_m2` over `count`
    tokens so far (Chan et al.), float64, no reassociation; each of its `norms` counted in
    `hist` (bin = how many `edges` are <= it, numpy's searchsorted side="right"). Returns
    the new count."""
    total = count + n
    for j in range(dim_mean.shape[0]):
        batch_mean = dim_sum[j] / n
        batch_m2 = max(dim_sq[j] - dim_sum[j] * batch_mean, 0.0)
        delta = batch_mean - dim_mean[j]
        dim_mean[j] += delta * (n / total)
        dim_m2[j] += batch_m2 + delta * delta * (count * n / total)
    for k in range(norms.shape[0]):
        value, lo, hi = norms[k], 0, edges.shape[0]
        while lo < hi:
            mid = (lo + hi) // 2
            if edges[mid] <= value:
                lo = mid + 1
            else:
                hi = mid
        hist[lo] += 1
    return total


@numba.njit(nogil=True, cache=True, error_model="numpy")
def update(x, keep, threshold, dim_sum, dim_sq, dim_lo, dim_hi, norms, count, dim_mean, dim_m2, hist, edges):
    """summarize and merge_dimensions in one call, for RunningStats.update: the per-batch
    work in Python (a dozen numpy calls on small arrays and their allocations) cost 120-150
    µs a file, about a third as much as the pass itself, and held the GIL while it ran. The
    scratch arrays (dim_sum … norms) are reset here. Returns (kept, sum of |x|, count
    below the threshold, finite, sum, sum of squares, min, max, sum of norms, new count);
    with no kept row, or a non-finite value, nothing is merged and the figures after
    `finite` are void."""
    dim_sum[:] = 0.0
    dim_sq[:] = 0.0
    dim_lo[:] = np.inf
    dim_hi[:] = -np.inf
    kept, sum_abs, below, finite = summarize(x, keep, threshold, dim_sum, dim_sq, dim_lo, dim_hi, norms)
    if not kept or not finite:
        return kept, sum_abs, below, finite, 0.0, 0.0, 0.0, 0.0, 0.0, count
    total = merge_dimensions(kept, dim_sum, dim_sq, norms[:kept], count, dim_mean, dim_m2, hist, edges)
    return kept, sum_abs, below, True, dim_sum.sum(), dim_sq.sum(), dim_lo.min(), dim_hi.max(), norms[:kept].sum(), total
