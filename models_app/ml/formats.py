"""Quantization formats and the memory each needs (DESIGN.md, "Formats and memory")."""

from __future__ import annotations

from .errors import InvalidInput

BYTES_PER_PARAM: dict[str, float] = {"FP32": 4.0, "FP16": 2.0, "Q8": 1.0, "Q4": 0.5, "Q2": 0.25}
# Overhead for activations, buffers and the allocator on top of the weights.
MEMORY_OVERHEAD = 1.2
# Formats this build can produce. The Q formats need the quantization job.
PRODUCIBLE_FORMATS: tuple[str, ...] = ("FP32", "FP16")


def memory_required_bytes(params_count: int, fmt: str) -> int:
    """params × bytes/param × 1.2, rounded to whole bytes."""
    return round(params_count * BYTES_PER_PARAM[fmt] * MEMORY_OVERHEAD)


def memory_by_format(params_count: int) -> dict[str, int]:
    return {fmt: memory_required_bytes(params_count, fmt) for fmt in BYTES_PER_PARAM}


def validate_format(value: str) -> str:
    fmt = (value or "").strip().upper()
    if fmt not in BYTES_PER_PARAM:
        known = ", ".join(BYTES_PER_PARAM)
        raise InvalidInput("quantization", f"Unknown quantization format {value!r}; choose one of {known}.")
    if fmt not in PRODUCIBLE_FORMATS:
        raise InvalidInput(
            "quantization",
            f"{fmt} quantization is not available yet: this build produces FP32 and FP16 only. "
            "Download as FP16 now and quantize later, once the quantization job lands.",
            code="format_not_available",
        )
    return fmt
