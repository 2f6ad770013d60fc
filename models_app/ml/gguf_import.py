"""Turn a GGUF file into a normal FP32 safetensors model folder through transformers.

transformers dequantizes GGUF tensors on load but refuses to save such a model, so the
weights are moved into a model built from the same config (without the GGUF
quantization entry) and that one is saved."""

from __future__ import annotations

from pathlib import Path

from mistudio.errors import JobError
from mistudio.staging import staged_dir


def gguf_to_safetensors(gguf_path: Path, dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with staged_dir(dest) as tmp:
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
