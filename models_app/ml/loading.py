"""The loading phase: read a model folder's config, check it is a decoder-only causal LM
we can hook, count its parameters exactly, and write the FP16 copy."""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from mistudio.errors import JobError

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


@functools.lru_cache(maxsize=4)
def _tokenizer(folder: str, thread: int):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def tokenizer_for(folder: Path):
    """A ready model's tokenizer, loaded once per process and thread for its last few
    folders (a folder's files never change once it is ready): the dialog's estimate, the
    start's check and the job in a `--sync` command each loaded it, at 0.12 s a load for
    SmolLM2. Per thread, because a call with truncation sets state on the Rust tokenizer
    ("Already borrowed" when two threads share one)."""
    import threading

    return _tokenizer(str(folder), threading.get_ident())


FITS = "decoder-only causal LMs whose blocks add an attention part and an MLP part to a residual stream"


def check_family(config: dict) -> str:
    """The config's model_type when transformers has a causal LM for it and it is not an
    encoder or an encoder-decoder; otherwise a refusal that says why."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = str(config.get("model_type") or "")
    if model_type in ENCODER_ONLY:
        raise JobError("unsupported_architecture",
                       f"{model_type} is an encoder-only (masked language) model; miStudio works with {FITS}.")  # fmt: skip
    if model_type in ENCODER_DECODER or config.get("is_encoder_decoder"):
        raise JobError("unsupported_architecture", f"{model_type} is an encoder-decoder model; miStudio works with {FITS}.")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        shown = model_type or "(no model_type in config.json)"
        raise JobError("unsupported_architecture",
                       f"Architecture {shown} has no causal language model in transformers; miStudio works with {FITS}.")  # fmt: skip
    return model_type


def check_architecture(config: dict) -> str:
    """check_family, then the family's blocks judged from the config alone (built tiny and
    random: see decoder.judge_config), before any weights are fetched. A config that cannot
    be built at toy size is judged again on the loaded model, when an extraction runs."""
    from .decoder import NotBuildable, judge_config

    model_type = check_family(config)
    try:
        judge_config(config)
    except NotBuildable:
        pass
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
    return sum(n for n, _ in parameter_inventory(config))


def parameter_inventory(config: dict) -> tuple[tuple[int, tuple[int, int] | None], ...]:
    """See _inventory: built once per config."""
    return _inventory(json.dumps(config, sort_keys=True, default=str))


def quantized_linear_names(model) -> set[str]:
    """The Linear layers the quantizers replace: every nn.Linear except the LM head."""
    import torch

    head = model.get_output_embeddings()
    return {
        name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and module is not head
    }


@functools.lru_cache(maxsize=32)
def _inventory(config_json: str) -> tuple[tuple[int, tuple[int, int] | None], ...]:
    """Each stored parameter once (tied weights once): its size, and its shape when it is a
    weight the quantizers replace. Built once per config on the meta device (0.06 s for
    SmolLM2; every format's estimate and every worker's check reads it)."""
    model = meta_model(json.loads(config_json))
    linear = quantized_linear_names(model)
    found, seen = [], set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue  # tied weights are stored once
            seen.add(id(param))
            quantized = module_name in linear and param_name == "weight"
            found.append((param.numel(), (int(param.shape[0]), int(param.shape[1])) if quantized else None))
    return tuple(found)




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


def verify_weights(folder: Path) -> None:
    """Refuse a folder whose weights are not exactly the model's (a truncated or mismatched
    download), judged by transformers' own loading report on the meta device (no tensor is
    read): missing, unexpected or wrongly shaped keys. It knows each family's renames (a
    Pythia head stored as `embed_out.weight`), tied heads and ignorable buffers."""
    import logging

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    stored_tensor_elements(folder)  # a truncated or unreadable shard is refused by name first
    if not any(folder.glob("*.safetensors")):
        return  # .bin-only repos are checked by loading them
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)  # its report table would go to the worker log
    try:
        _, report = AutoModelForCausalLM.from_pretrained(folder, device_map="meta", output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - whatever transformers refuses, the model is not loadable
        raise JobError("invalid_model", f"transformers cannot load these weights: {type(exc).__name__}: {exc}"[:600]) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    problems = []
    for kind, label in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"), ("mismatched_keys", "of the wrong shape")):
        keys = sorted(str(k if isinstance(k, str) else k[0]) for k in report.get(kind) or ())
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            problems.append(f"{len(keys)} {label} ({shown})")
    if problems:
        raise JobError(
            "invalid_model",
            f"The weight files do not match config.json: {'; '.join(problems)}. The download is incomplete or the "
            "weights belong to another model.",
        )


def inspect_model(folder: Path) -> ModelFacts:
    config = read_config(folder)
    architecture = check_architecture(config)
    params = sum(p.numel() for p in meta_model(config).parameters())
    verify_weights(folder)
    return ModelFacts(architecture=architecture, params_count=params, config=config)


def copy_sidecar_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """The tokenizer and config files beside the weights (those in `skip` aside)."""
    for name in SIDECAR_FILES:
        if name not in skip and (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts)
