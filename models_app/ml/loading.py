"""The loading phase: read a model folder's config, check it is a decoder-only causal LM
we can hook, count its parameters exactly, and write the FP16 copy."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from mistudio.errors import JobError

SUPPORTED_ARCHITECTURES = ("gpt2", "llama", "mistral", "qwen2", "phi", "phi3", "gpt_neox", "gemma")
ENCODER_ONLY = {
    "albert", "bert", "camembert", "deberta", "deberta-v2", "distilbert", "electra",
    "ernie", "modernbert", "mpnet", "roberta", "xlm-roberta",
}  # fmt: skip
ENCODER_DECODER = {"bart", "mbart", "marian", "mt5", "pegasus", "t5", "whisper"}
# Files a model folder needs besides its weights; everything else in a repo is skipped.
SIDECAR_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "tokenizer.model", "chat_template.jinja",
)  # fmt: skip


@dataclass(frozen=True)
class ModelFacts:
    architecture: str
    params_count: int
    config: dict


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise JobError("invalid_model", "The model has no config.json, so its architecture is unknown.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise JobError("invalid_model", f"config.json is not valid JSON ({exc}).") from None


def check_architecture(config: dict) -> str:
    """The config's model_type when we support it; otherwise a refusal that says why."""
    model_type = str(config.get("model_type") or "")
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    if model_type in ENCODER_ONLY:
        raise JobError(
            "unsupported_architecture",
            f"{model_type} is an encoder-only (masked language) model; miStudio works with decoder-only "
            f"causal LMs ({supported}).",
        )
    if model_type in ENCODER_DECODER:
        raise JobError(
            "unsupported_architecture",
            f"{model_type} is an encoder-decoder model; miStudio works with decoder-only causal LMs ({supported}).",
        )
    if model_type not in SUPPORTED_ARCHITECTURES:
        shown = model_type or "(no model_type in config.json)"
        raise JobError(
            "unsupported_architecture",
            f"Architecture {shown} is not supported; supported decoder-only architectures: {supported}.",
        )
    return model_type


def _config_object(config: dict):
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k not in {"model_type", "quantization_config"}}
    return AutoConfig.for_model(config["model_type"], **fields)


def meta_model(config: dict):
    """The model the config describes, built on the meta device: every module and shape,
    no weights read and no memory allocated."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(_config_object(config))


def count_parameters(config: dict) -> int:
    """Exact parameter count as transformers reports it (tied weights once)."""
    return sum(p.numel() for p in meta_model(config).parameters())


def stored_tensor_elements(folder: Path) -> dict[str, int]:
    """Element count of every tensor in the folder's safetensors files, read from headers."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    shape = handle.get_slice(name).get_shape()
                    n = 1
                    for dim in shape:
                        n *= dim
                    counts[name] = n
        except Exception as exc:  # safetensors raises its own error types for truncated files
            raise JobError("invalid_model", f"{path.name} is not a readable safetensors file ({exc}).") from None
    return counts


def verify_weights(folder: Path, model, params_count: int, config: dict) -> None:
    """Refuse a folder whose safetensors do not hold exactly the model's parameters (a
    truncated or mismatched download), allowing for a tied LM head stored twice.

    Only tensors that are parameters count: GPT-2 and Pythia checkpoints also store buffers
    (the causal mask `attn.bias`, `masked_bias`, `rotary_emb.inv_freq`), which transformers
    rebuilds and ignores on load. Names are matched with and without the base model's
    prefix (GPT-2 stores `h.0.…` for `transformer.h.0.…`)."""
    counts = stored_tensor_elements(folder)
    if not counts:
        return  # .bin-only repos are checked by loading them
    names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else ""
    names |= {name.removeprefix(prefix) for name in names if prefix and name.startswith(prefix)}
    parameters = {name: n for name, n in counts.items() if name in names}
    stored = sum(parameters.values())
    head = sum(n for name, n in parameters.items() if name.endswith("lm_head.weight") or name == "embed_out.weight")
    if stored == params_count or (config.get("tie_word_embeddings") and stored - head == params_count):
        return
    raise JobError(
        "invalid_model",
        f"The weight files hold {stored:,} parameter values but the config describes {params_count:,}; "
        "the download is incomplete or the weights do not match config.json.",
    )


def inspect_model(folder: Path) -> ModelFacts:
    config = read_config(folder)
    architecture = check_architecture(config)
    model = meta_model(config)  # built once: counting and checking both walk it
    params = sum(p.numel() for p in model.parameters())
    verify_weights(folder, model, params, config)
    return ModelFacts(architecture=architecture, params_count=params, config=config)


def copy_sidecar_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """The tokenizer and config files beside the weights (those in `skip` aside)."""
    for name in SIDECAR_FILES:
        if name not in skip and (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts)
