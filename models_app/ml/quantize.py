"""Quantization: produce FP16 / Q8 / Q4 / Q2 copies of a stored snapshot, save them so
they reload without re-quantizing, and say honestly what was made and why.

Q8 and Q4 are bitsandbytes (LLM.int8 with threshold 6.0; NF4 with double quantization),
which runs on CPU and GPU. Q2 is HQQ 2-bit with groups of 64 (calibration-free, a scale and
a zero per group): of every 2-bit method that installs here, the best at a 2-bit size
(scripts/bench-2bit; README). transformers 5.24 cannot make HQQ models ("not available yet"),
so HQQ's own API quantizes, saves and reloads them. Q2 models made before, with
optimum-quanto int2, still reload (their quantization map, `requantize`; their forward pass
must run under `torch.no_grad()`, not `inference_mode()`).
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mistudio.devices import compute_device, memory_budget  # noqa: F401 - the ml package's names for them
from mistudio.errors import JobError
from mistudio.hub import format_bytes
from mistudio.staging import staged_dir

from .formats import MEMORY_OVERHEAD
from .loading import copy_sidecar_files, parameter_inventory

FORMATS_SMALLEST_LAST = ("FP32", "FP16", "Q8", "Q4", "Q2")
# A format whose backend is missing falls back along this chain.
BACKEND_FALLBACK = {"Q2": "Q4", "Q4": "Q8", "Q8": "FP16"}
QUANTO_MAP_FILE = "quanto_qmap.json"
FORMAT_FILE = "mistudio_format.json"
# Bytes per parameter of a quantized Linear weight, scales and offsets included:
# LLM.int8 keeps one float32 scale per output row (counted per weight below);
# NF4 with double quant: 4 bits + an 8-bit absmax per 64 values + float32 per 256 blocks;
# HQQ 2-bit: 2 bits + a scale and a zero per group of 64, in the compute dtype (below).
QUANTIZED_LINEAR_BYTES = {"Q8": 1.0, "Q4": 0.5 + 1 / 64 + 4 / (64 * 256), "Q2": 0.25}
HQQ_Q2 = {"nbits": 2, "group_size": 64}


class NothingToQuantize(Exception):
    """The format's backend finds no layer of this model it can quantize."""


@dataclass
class QuantizeResult:
    requested: str
    produced: str
    notes: list[str] = field(default_factory=list)
    footprint_bytes: int = 0
    peak_cuda_bytes: int | None = None
    seconds: float = 0.0
    offloaded: bool = False
    streamed: bool = False  # Q8/Q4 made tensor by tensor from the shards (quantize_streamed)


def base_dtype(device: str):
    """The dtype of the weights a quantized model keeps unquantized (embeddings, norms, head)."""
    import torch

    return torch.float16 if device == "cuda" else torch.float32


def backend_missing(fmt: str) -> str | None:
    """Why `fmt` cannot be produced on this machine, or None when it can. Asked of the
    installed packages, not by importing them (bitsandbytes takes 2 s and optimum-quanto 1 s
    to import here: every estimate asked five times); a package that is there but broken
    fails the job that loads it, with its own error."""
    from importlib.util import find_spec

    if fmt in ("Q8", "Q4") and find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    if fmt == "Q2" and find_spec("hqq") is None:
        return "no 2-bit backend is installed (hqq)"
    return None


def estimate_weight_bytes(config: dict, fmt: str, device: str = "cpu") -> int:
    """Bytes the weights take in memory in `fmt`, counted module by module: quantizers only
    replace Linear layers, so embeddings, norms and the (tied) head stay in float."""
    float_bytes = 4 if fmt == "FP32" or (fmt != "FP16" and device == "cpu") else 2
    total = 0.0
    for n, linear_shape in parameter_inventory(config):
        if fmt in QUANTIZED_LINEAR_BYTES and linear_shape is not None:
            total += n * QUANTIZED_LINEAR_BYTES[fmt]
            if fmt == "Q8":
                total += linear_shape[0] * 4
            elif fmt == "Q2":
                total += 2 * float_bytes * (n // HQQ_Q2["group_size"])
        else:
            total += n * float_bytes
    return int(total)


def memory_estimate(config: dict, device: str = "cpu") -> dict[str, int]:
    """Memory each format needs (weights × 1.2 for activations and allocator overhead)."""
    return {fmt: round(estimate_weight_bytes(config, fmt, device) * MEMORY_OVERHEAD) for fmt in FORMATS_SMALLEST_LAST}


def making_peak(fmt: str, estimates: dict[str, int], device: str) -> int:
    """Memory needed while the format is made. bitsandbytes quantizes layer by layer as it
    loads, so Q8/Q4 peak near their own size; HQQ quantizes a model already loaded in full
    precision (float16 on a GPU, float32 on CPU), so Q2 peaks at that size."""
    if fmt == "Q2":
        return max(estimates["Q2"], estimates["FP16" if device == "cuda" else "FP32"])
    return estimates[fmt]


def choose_format(
    requested: str, estimates: dict[str, int], budget: int | None, device: str = "cpu"
) -> tuple[str, list[str]]:
    """The format to make: the requested one if its backend exists here and it fits the
    budget (while it is made, too), else the next one down, with a note for every step."""
    fmt, notes = requested, []
    while (reason := backend_missing(fmt)) is not None:
        nxt = BACKEND_FALLBACK[fmt]
        notes.append(f"{fmt} cannot be produced here: {reason}; made {nxt} instead.")
        fmt = nxt
    if budget is None:
        return fmt, notes
    start = FORMATS_SMALLEST_LAST.index(fmt)
    for candidate in FORMATS_SMALLEST_LAST[start:]:
        if backend_missing(candidate) is not None:
            continue
        if making_peak(candidate, estimates, device) <= budget:
            if candidate != fmt:
                notes.append(
                    f"{fmt} needs {format_bytes(making_peak(fmt, estimates, device))}, more than the "
                    f"{format_bytes(budget)} budget; made {candidate} ({format_bytes(estimates[candidate])}) instead."
                )
            return candidate, notes
    available = [f for f in FORMATS_SMALLEST_LAST if backend_missing(f) is None]
    # Only Q2's making peak can exceed a larger format's: then the smallest model whose making fits.
    makeable = [f for f in available if making_peak(f, estimates, device) <= budget]
    if makeable:
        candidate = min(makeable, key=estimates.__getitem__)
        notes.append(
            f"{fmt} needs {format_bytes(making_peak(fmt, estimates, device))} while it is made, more than the "
            f"{format_bytes(budget)} budget; made {candidate} ({format_bytes(estimates[candidate])}) instead."
        )
        return candidate, notes
    smallest = min(available, key=estimates.__getitem__)
    peak = making_peak(smallest, estimates, device)
    while_made = f" ({format_bytes(peak)} while it is made)" if peak > estimates[smallest] else ""
    raise JobError(
        "does_not_fit",
        f"The memory budget is {format_bytes(budget)}, but even {smallest} needs "
        f"{format_bytes(estimates[smallest])}{while_made}. Raise MISTUDIO_GPU_MEMORY_LIMIT or free memory.",
        suggested_format=None,
    )


def next_smaller(fmt: str) -> str | None:
    for candidate in FORMATS_SMALLEST_LAST[FORMATS_SMALLEST_LAST.index(fmt) + 1 :]:
        if backend_missing(candidate) is None:
            return candidate
    return None


def load_in_format(src: Path, fmt: str, device: str, max_memory: dict | None = None):
    """Load the snapshot at `src` quantized to `fmt` on `device` (quantizing in memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"trust_remote_code": False, "device_map": "auto" if max_memory else device}
    if max_memory:
        kwargs["max_memory"] = max_memory
    if fmt == "FP32":
        return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kwargs)
    if fmt == "FP16":
        return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16, **kwargs)
    # With CPU offload, bitsandbytes keeps the offloaded modules in float32 only when asked.
    offload = {"llm_int8_enable_fp32_cpu_offload": True} if max_memory else {}
    if fmt in ("Q8", "Q4"):
        config = bnb_config(fmt, device, **offload)
        return AutoModelForCausalLM.from_pretrained(src, quantization_config=config, dtype=base_dtype(device), **kwargs)
    if fmt == "Q2":
        import contextlib
        import sys

        from hqq.core.quantize import BaseQuantizeConfig
        from hqq.models.base import get_linear_tags_from_model
        from hqq.models.hf.base import AutoHQQHFModel

        model = AutoModelForCausalLM.from_pretrained(src, dtype=base_dtype(device), **kwargs).eval()
        # Every Linear but the output head (lm_head, GPT-NeoX's embed_out): the embeddings and
        # the head stay in the compute dtype.
        head = model.get_output_embeddings()
        model.linear_tags = get_linear_tags_from_model(model, ignore=[n.split(".")[-1] for n, m in model.named_modules() if m is head])
        if not model.linear_tags:
            raise NothingToQuantize(f"Q2 (HQQ) quantizes Linear layers, and {type(model).__name__} has none but its output "
                                    "head (its blocks use another layer type, as GPT-2's Conv1D)")  # fmt: skip
        # One device for every block ({"": device}): HQQ's own block map knows only model.layers
        # (and says so on stdout, where a --json command's answer goes).
        with contextlib.redirect_stdout(sys.stderr):
            AutoHQQHFModel.quantize_model(model, quant_config=BaseQuantizeConfig(**HQQ_Q2), compute_dtype=base_dtype(device),
                                          device={"": device})  # fmt: skip
        return model
    raise ValueError(fmt)


def bnb_config(fmt: str, device: str, **extra):
    """The one Q8 recipe (LLM.int8, outlier threshold 6.0) and the one Q4 recipe (NF4 with
    double quantization), for both ways each is made."""
    from transformers import BitsAndBytesConfig

    if fmt == "Q8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0, **extra)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=base_dtype(device),
        **extra,
    )


# Q8 and Q4 streamed: a model larger than memory (a 13B's 26 GB of FP16 on a 23 GB machine)
# is quantized tensor by tensor from its mapped safetensors shards into transformers' own
# serialized bitsandbytes layout, so `load_saved` reloads it as if transformers had made it
# (tests: the same bytes, key for key). Only the quantized shard being written is held.
STREAMED_FORMATS = ("Q8", "Q4")
STREAM_SHARD_BYTES = 2 * 1024**3


@dataclass
class StreamPlan:
    fmt: str
    shards: list[Path]
    quantized: dict[str, bool]  # weight name -> transpose first (a GPT-2 Conv1D)
    total_bytes: int


def _quantized_parts(fmt: str, key: str, weight) -> dict:
    """One Linear weight as bitsandbytes' Linear8bitLt / Linear4bit save it."""
    import bitsandbytes.functional as bnbf
    import torch

    if fmt == "Q8":  # Int8Params rounds to float16, then one absmax scale per output row
        rows, scales, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16))
        module = key.removesuffix(".weight")
        return {key: rows, f"{module}.SCB": scales, f"{module}.weight_format": torch.tensor(0, dtype=torch.uint8)}
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    return {key: packed, **{f"{key}.{k}": v for k, v in state.as_dict(packed=True).items()}}


def _safetensors_shards(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        names = json.loads(index.read_text()).get("weight_map", {}).values()
        return [src / name for name in sorted(set(names))]
    return [src / "model.safetensors"] if (src / "model.safetensors").is_file() else []


def stream_plan(src: Path, fmt: str, device: str) -> StreamPlan | str:
    """What streaming `src` to `fmt` would quantize, or why it cannot (then transformers loads
    it whole): CPU only (on a GPU transformers quantizes on the card as it loads), and only
    a safetensors checkpoint whose tensor names are the model's own (transformers renames
    some families' weights while loading; those go its way)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.base import HfQuantizer

    if device != "cpu":
        return "made on the GPU by transformers as it loads"
    shards = _safetensors_shards(src)
    if not shards or not all(shard.is_file() for shard in shards):
        return "no safetensors checkpoint"
    config = AutoConfig.from_pretrained(src)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = set(model.state_dict())
    tied = set(model.all_tied_weights_keys)
    stored: set[str] = set()
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            stored |= set(f.keys())
    if not stored <= expected or not expected - stored <= tied:
        return "its checkpoint names weights other than the model's (transformers renames them as it loads)"
    skip = HfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
    replace_with_bnb_linear(model, skip, bnb_config(fmt, device))
    from bitsandbytes.nn import Linear4bit, Linear8bitLt
    from transformers.pytorch_utils import Conv1D

    quantized = {f"{name}.weight": issubclass(getattr(module, "source_cls", object), Conv1D)
                 for name, module in model.named_modules() if isinstance(module, (Linear4bit, Linear8bitLt))}  # fmt: skip
    return StreamPlan(fmt, shards, quantized, sum(shard.stat().st_size for shard in shards))


def quantize_streamed(plan: StreamPlan, src: Path, dest: Path, device: str, on_bytes=None) -> None:
    """`plan.fmt` from `plan` into `dest` (complete or absent), with `on_bytes(done, total)` as
    each source tensor is quantized. What stays in memory: the output shard being filled (up
    to STREAM_SHARD_BYTES) and one source tensor in its float forms."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig

    dtype = base_dtype(device)
    written: list[tuple[Path, list[str]]] = []
    done = 0
    with staged_dir(dest) as tmp:
        pending: dict = {}
        pending_bytes = 0

        def flush() -> None:
            nonlocal pending, pending_bytes
            if pending:
                path = tmp / f"part-{len(written):05d}.safetensors"
                save_file(pending, str(path), metadata={"format": "pt"})
                written.append((path, list(pending)))
            pending, pending_bytes = {}, 0

        for shard in plan.shards:
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    done += tensor.nbytes
                    if key in plan.quantized:
                        weight = tensor.to(dtype)
                        weight = (weight.T if plan.quantized[key] else weight).contiguous()
                        del tensor
                        parts = _quantized_parts(plan.fmt, key, weight)
                        del weight
                    else:
                        parts = {key: tensor.to(dtype).contiguous()}
                    pending.update(parts)
                    pending_bytes += sum(part.nbytes for part in parts.values())
                    if pending_bytes >= STREAM_SHARD_BYTES:
                        flush()
                    if on_bytes is not None:
                        on_bytes(min(done, plan.total_bytes), plan.total_bytes)
        flush()
        _name_shards(tmp, written)
        config = AutoConfig.from_pretrained(src)
        config.quantization_config = bnb_config(plan.fmt, device)
        config.dtype = dtype
        config.save_pretrained(tmp)
        copy_sidecar_files(src, tmp, skip=("config.json",))
        (tmp / FORMAT_FILE).write_text(json.dumps({"format": plan.fmt}))
    if on_bytes is not None:
        on_bytes(plan.total_bytes, plan.total_bytes)


def _name_shards(folder: Path, written: list[tuple[Path, list[str]]]) -> None:
    """transformers' names for the shards, and its index when there are several."""
    if len(written) == 1:
        written[0][0].rename(folder / "model.safetensors")
        return
    weight_map, total = {}, 0
    for i, (path, keys) in enumerate(written, start=1):
        name = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        total += path.stat().st_size
        path.rename(folder / name)
        weight_map |= dict.fromkeys(keys, name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def save_in_format(model, fmt: str, src: Path, dest: Path) -> None:
    """Save to `dest` (complete or absent: written to a sibling folder, then renamed)."""
    with staged_dir(dest) as tmp:
        if fmt == "Q2":
            from hqq.models.hf.base import AutoHQQHFModel

            AutoHQQHFModel.save_quantized(model, str(tmp))  # config.json and qmodel.pt (read back weights_only)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        copy_sidecar_files(src, tmp, skip=("config.json",))  # the saved model wrote its own
        (tmp / FORMAT_FILE).write_text(json.dumps({"format": fmt}))


def load_saved(folder: Path, device: str | None = None):
    """Reload a saved format from disk without quantizing again."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    device = device or compute_device()
    fmt = json.loads((folder / FORMAT_FILE).read_text())["format"] if (folder / FORMAT_FILE).is_file() else "FP32"
    if fmt == "Q2" and not (folder / QUANTO_MAP_FILE).is_file():
        from hqq.models.hf.base import AutoHQQHFModel

        return AutoHQQHFModel.from_quantized(str(folder), device=device, compute_dtype=base_dtype(device)).eval()
    if fmt != "Q2":
        # The dtype is the format's, never the checkpoint's: transformers would otherwise load
        # a Hub snapshot stored in bfloat16 (most are) as bfloat16 for an "FP32" model.
        dtype = {"FP32": torch.float32, "FP16": torch.float16}.get(fmt, base_dtype(device))
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device, trust_remote_code=False)
    from accelerate import init_empty_weights
    from optimum.quanto import requantize
    from safetensors.torch import load_file

    # A Q2 model made with optimum-quanto int2 (before HQQ).
    config = AutoConfig.from_pretrained(folder)
    # Parameters on the meta device (the file fills them), buffers built for real: a buffer
    # the file does not hold (RoPE's inv_freq is not persistent) would otherwise be left as
    # uninitialised memory by requantize, and every reload would compute something else.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=base_dtype(device))
    state = load_file(str(folder / "model.safetensors"), device="cpu")
    qmap = json.loads((folder / QUANTO_MAP_FILE).read_text())
    requantize(model, state, qmap, device=torch.device(device))
    model.tie_weights()
    tied = model.config.tie_word_embeddings
    left = [name for name in model.state_dict() if name not in state and not (tied and name.startswith("lm_head."))]
    if left:
        raise JobError("weights_incomplete", f"{folder.name} does not hold every weight of its model (missing {left[0]}); "
                                             "make the Q2 format again.")  # fmt: skip
    model.eval()
    return model


def measured_bytes(model, fmt: str) -> int:
    """Memory the loaded weights take. get_memory_footprint misses HQQ's scales and zeros
    (kept outside the parameters) and counts quanto's packed int2 tensors at their logical
    float size, so Q2 is measured from the tensors its state dict holds."""
    import torch

    if fmt != "Q2":
        return int(model.get_memory_footprint())
    seen: set[int] = set()
    total = 0
    for tensor in model.state_dict().values():
        if not isinstance(tensor, torch.Tensor):  # HQQ's state dict holds its settings too
            continue
        key = tensor.data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def free_accelerator_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def quantize_snapshot(
    src: Path,
    requested: str,
    dest_for: Callable[[str], Path],
    estimates: dict[str, int],
    budget: int | None,
    device: str | None = None,
    loader: Callable | None = None,
    on_bytes: Callable[[int, int], None] | None = None,
) -> tuple[object, QuantizeResult]:
    """Make `requested` (or the best format that can be made and fits) from the snapshot at
    `src`; on a CUDA out-of-memory retry the next smaller format, then CPU offload. Q8 and Q4
    on the CPU are streamed from the shards (`on_bytes(done, total)` as it goes) and reloaded."""
    import torch

    device = device or compute_device()
    fmt, notes = choose_format(requested, estimates, budget, device)
    result = QuantizeResult(requested=requested, produced=fmt, notes=notes)
    started = time.perf_counter()
    own_loader = loader is None  # a test's loader is never bypassed by the stream

    def streamed(fmt: str) -> tuple[object, QuantizeResult] | None:
        """`fmt` made from the shards and reloaded, where it can be (stream_plan)."""
        plan = stream_plan(src, fmt, device) if fmt in STREAMED_FORMATS and own_loader else None
        if not isinstance(plan, StreamPlan):
            return None
        quantize_streamed(plan, src, dest_for(fmt), device, on_bytes)
        model = load_saved(dest_for(fmt), device)
        result.produced, result.streamed = fmt, True
        result.footprint_bytes = measured_bytes(model, fmt)
        result.seconds = time.perf_counter() - started
        return model, result

    if (made := streamed(fmt)) is not None:
        return made
    loader = loader or load_in_format
    offload = False
    while True:
        try:
            free_accelerator_memory()
            max_memory = {0: budget, "cpu": "64GiB"} if offload and budget else None
            model = loader(src, fmt, device, max_memory) if max_memory else loader(src, fmt, device)
            break
        except NothingToQuantize as exc:  # Q2 of a model without Linear layers: Q4 (bitsandbytes takes Conv1D)
            if fmt not in BACKEND_FALLBACK:
                raise JobError("nothing_to_quantize", f"{exc}.") from None
            notes.append(f"{exc}; made {BACKEND_FALLBACK[fmt]} instead.")
            fmt = BACKEND_FALLBACK[fmt]
            if (made := streamed(fmt)) is not None:
                return made
        except torch.cuda.OutOfMemoryError:
            model = None
            free_accelerator_memory()
            smaller = next_smaller(fmt)
            if smaller is not None:
                notes.append(f"{fmt} ran out of GPU memory while loading; retried with {smaller}.")
                fmt = smaller
            elif not offload and device == "cuda":
                notes.append(f"{fmt} ran out of GPU memory; retried with CPU offload (accelerate).")
                offload = True
            else:
                raise JobError(
                    "out_of_memory",
                    f"Ran out of GPU memory even as {fmt}, the smallest format"
                    f"{' with CPU offload' if offload else ''}. Free GPU memory or use a smaller model.",
                    suggested_format=None,  # nothing smaller exists to suggest
                ) from None
    result.produced = fmt
    result.offloaded = offload
    # Saved before the model runs: bitsandbytes' CPU path changes a 4-bit model's weights in
    # memory on its first forward, and a model saved after that reloads as another model
    # (0.24 logit away on SmolLM2-135M; models_app/tests/bench_2bit.py).
    save_in_format(model, fmt, src, dest_for(fmt))
    result.footprint_bytes = measured_bytes(model, fmt)
    if device == "cuda":
        result.peak_cuda_bytes = int(torch.cuda.max_memory_allocated())
    result.seconds = time.perf_counter() - started
    return model, result
