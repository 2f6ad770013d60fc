"""What a model looks like inside, from its config alone: the model is built on the meta
device (no weights, no memory) and its modules are walked. One module map per
architecture family says where the decoder blocks, attention and MLP live; activation
extraction attaches its hooks at exactly these modules."""

from __future__ import annotations

from dataclasses import dataclass

from mistudio.errors import JobError

from .loading import SUPPORTED_ARCHITECTURES, meta_model


@dataclass(frozen=True)
class ModuleMap:
    blocks: str  # dotted path of the ModuleList of decoder blocks
    attention: str  # attribute of a block: the attention module (its output, before the residual add)
    mlp: str  # attribute of a block: the MLP module
    embedding: str
    final_norm: str


_LLAMA_LIKE = ModuleMap("model.layers", "self_attn", "mlp", "model.embed_tokens", "model.norm")
MODULE_MAPS: dict[str, ModuleMap] = {
    "gpt2": ModuleMap("transformer.h", "attn", "mlp", "transformer.wte", "transformer.ln_f"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "phi": ModuleMap("model.layers", "self_attn", "mlp", "model.embed_tokens", "model.final_layernorm"),
    "gpt_neox": ModuleMap("gpt_neox.layers", "attention", "mlp", "gpt_neox.embed_in", "gpt_neox.final_layer_norm"),
}
assert set(MODULE_MAPS) == set(SUPPORTED_ARCHITECTURES)

HOOK_DESCRIPTIONS = {
    "residual": "output of the decoder block (the residual stream after it)",
    "attention": "attention output, before it is added to the residual",
    "mlp": "MLP output, before it is added to the residual",
}


def module_map(model_type: str) -> ModuleMap:
    try:
        return MODULE_MAPS[model_type]
    except KeyError:
        raise JobError("unsupported_architecture", f"No module map for architecture {model_type!r}.") from None


def _get(root, dotted: str):
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def _first(config: dict, *names: str, default=None):
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return default


def _parameter_shapes(module) -> list[dict]:
    return [
        {"name": name, "shape": list(param.shape)}
        for name, param in module.named_parameters()
    ]


def describe(config: dict) -> dict:
    """Tiles, layer list (with sub-modules, shapes and hook points) and config summary."""
    model_type = str(config.get("model_type"))
    mapping = module_map(model_type)
    model = meta_model(config)
    blocks = _get(model, mapping.blocks)
    hidden = int(_first(config, "hidden_size", "n_embd"))
    heads = int(_first(config, "num_attention_heads", "n_head"))
    kv_heads = int(_first(config, "num_key_value_heads", default=heads))
    head_dim = int(_first(config, "head_dim", default=hidden // heads))
    intermediate = int(_first(config, "intermediate_size", "n_inner", default=4 * hidden) or 4 * hidden)
    vocab = int(config.get("vocab_size"))
    embedding = _get(model, mapping.embedding)
    layers = [
        {"index": 0, "name": "Embedding", "detail": f"Shape: {vocab:,} × {hidden}", "path": mapping.embedding,
         "shape": list(embedding.weight.shape)},
    ]  # fmt: skip
    for i, block in enumerate(blocks):
        path = f"{mapping.blocks}.{i}"
        attention, mlp = getattr(block, mapping.attention), getattr(block, mapping.mlp)
        layers.append(
            {
                "index": i + 1,
                "block": i,
                "name": f"TransformerBlock_{i}",
                "detail": f"Attention: {heads} heads × {head_dim} dims | MLP: {hidden} → {intermediate} → {hidden}",
                "path": path,
                "hooks": [{"name": "residual", "path": path, "description": HOOK_DESCRIPTIONS["residual"]}],
                "submodules": [
                    {
                        "kind": "Attention",
                        "path": f"{path}.{mapping.attention}",
                        "type": type(attention).__name__,
                        "parameters": _parameter_shapes(attention),
                        "hooks": [{"name": "attention", "description": HOOK_DESCRIPTIONS["attention"]}],
                    },
                    {
                        "kind": "MLP",
                        "path": f"{path}.{mapping.mlp}",
                        "type": type(mlp).__name__,
                        "parameters": _parameter_shapes(mlp),
                        "hooks": [{"name": "mlp", "description": HOOK_DESCRIPTIONS["mlp"]}],
                    },
                ],
            }
        )
    head = model.get_output_embeddings()
    head_path = next(name for name, module in model.named_modules() if module is head)
    layers.append({"index": len(layers), "name": "LayerNorm", "detail": f"Shape: {hidden}", "path": mapping.final_norm})
    layers.append(
        {"index": len(layers), "name": "Output", "detail": f"Shape: {hidden} × {vocab:,}", "path": head_path,
         "tied": head.weight is embedding.weight}
    )  # fmt: skip
    return {
        "architecture": model_type,
        "tiles": {
            "layers": len(blocks),
            "hidden": hidden,
            "heads": heads,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "layers": layers,
        "summary": {
            "vocab_size": vocab,
            "max_position": _first(config, "max_position_embeddings", "n_positions"),
            "mlp_ratio": round(intermediate / hidden, 2),
            "architecture": model_type,
        },
    }
