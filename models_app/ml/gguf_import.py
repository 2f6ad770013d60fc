"""Turn a GGUF file into a normal FP32 safetensors model folder through transformers.

transformers dequantizes GGUF tensors on load but refuses to save such a model, so the
weights are moved into a model built from the same config (without the GGUF
quantization entry) and that one is saved."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from mistudio.errors import JobError
from mistudio.staging import staged_dir


def gguf_to_safetensors(gguf_path: Path, dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with staged_dir(dest) as tmp, _one_parse():
        try:
            loaded = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise JobError("invalid_model", f"transformers could not read {gguf_path.name}: {exc}") from None
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.eval()
        del loaded
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


@contextmanager
def _one_parse():
    """transformers reads a GGUF file's header three times (config, weights, tokenizer) and
    builds gguf's tensor-name table once per module of the model (397 times for SmolLM2,
    each time the same table); here each is done once. The header: one reader serves all
    three reads, and the two metadata-only reads share one parse of its values (every
    vocabulary entry, ~3 s for SmolLM2's 49,152 tokens on this CPU). Nothing here writes:
    the reader is a read-only memory map, the table is only looked up in, and each caller
    gets its own copy of the parsed metadata.

    SmolLM2-135M's Q4_1 GGUF on one thread of a 2-core machine: 19.8 s -> 10.7 s for the
    whole import with the shared reader (an earlier, faster machine); then, on a slower one,
    38.8 s -> 28.9 s for the import-and-generate test with the shared parse and table
    (56.9 s -> 42.2 s of gguf_to_safetensors under cProfile)."""
    import copy
    import functools

    import gguf
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    originals = (gguf.GGUFReader, gguf.get_tensor_name_map, gguf_utils.load_gguf_checkpoint)
    readers: dict = {}
    metadata: dict = {}

    def shared(path, mode="r"):
        key = (str(path), mode)
        if key not in readers:
            readers[key] = originals[0](path, mode)
        return readers[key]

    def load_checkpoint(path, return_tensors=False, *args, **kwargs):
        if return_tensors or args or kwargs:
            return originals[2](path, return_tensors, *args, **kwargs)
        if str(path) not in metadata:
            metadata[str(path)] = originals[2](path, False)
        return copy.deepcopy(metadata[str(path)])

    gguf.GGUFReader = shared
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(originals[1])
    gguf_utils.load_gguf_checkpoint = load_checkpoint
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map, gguf_utils.load_gguf_checkpoint = originals
