"""Quantization formats and the memory each needs (DESIGN.md, "Formats and memory")."""

from __future__ import annotations

from mistudio.errors import InvalidInput

BYTES_PER_PARAM: dict[str, float] = {"FP32": 4.0, "FP16": 2.0, "Q8": 1.0, "Q4": 0.5, "Q2": 0.25}
# Overhead for activations, buffers and the allocator on top of the weights.
MEMORY_OVERHEAD = 1.2


def validate_format(value: str) -> str:
    fmt = (value or "").strip().upper()
    if fmt not in BYTES_PER_PARAM:
        known = ", ".join(BYTES_PER_PARAM)
        raise InvalidInput("quantization", f"Unknown quantization format {value!r}; choose one of {known}.")
    return fmt
