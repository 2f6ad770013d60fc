"""What a model looks like inside, from its config alone: the model is built on the meta
device (no weights, no memory) and its modules are walked. Which modules are the blocks,
and whose outputs are what attention and the MLP add to the stream, comes from the same
discovery extraction hooks by (models_app.ml.decoder), so the viewer shows exactly where
each hook sits: on a post-norm (Gemma 2/3, OLMo 2), with a multiplier (Granite), in
parallel blocks (GPT-NeoX, Phi, Cohere), over experts (Mixtral, Qwen 3 MoE)."""

from __future__ import annotations

from . import decoder
from .loading import meta_model

HOOK_DESCRIPTIONS = {
    "residual": "output of the decoder block (the residual stream after it)",
    "attention": "what attention adds to the residual stream",
    "mlp": "what the MLP adds to the residual stream",
}


def _first(config: dict, *names: str, default=None):
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return default


def _parameter_shapes(module) -> list[dict]:
    return [{"name": name, "shape": list(param.shape)} for name, param in module.named_parameters()]


def _name_of(model, target) -> str | None:
    return next((name for name, module in model.named_modules() if module is target), None)


def _experts(module) -> int | None:
    """How many experts an MLP part holds (a ModuleList of experts, or fused 3-D weights)."""
    import torch

    for name, child in module.named_modules():
        if "expert" in name.rsplit(".", 1)[-1].lower() and isinstance(child, torch.nn.ModuleList):
            return len(child)
    fused = [p.shape[0] for n, p in module.named_parameters() if "expert" in n.lower() and p.dim() == 3]
    return fused[0] if fused else None


def _kind(name: str, type_name: str, role: str | None, attention_path: str, mlp_path: str) -> str:
    lowered = f"{name} {type_name}".lower()
    if "dropout" in lowered:
        return "Dropout"
    if "norm" in lowered:
        norm = "RMSNorm" if "rmsnorm" in type_name.lower() else "LayerNorm" if "layernorm" in type_name.lower() else "Norm"
        if role == "attention":
            return f"Post-attention {norm}"
        if role == "mlp":
            return f"Post-MLP {norm}"
        return norm
    if name == attention_path.split(".")[0] or "attn" in lowered or "attention" in lowered:
        return "Attention"
    if name == mlp_path.split(".")[0] or "mlp" in lowered or "moe" in lowered or "feed_forward" in lowered:
        return "MLP"
    return "Module"


def _layout(config: dict):
    try:
        return decoder.judge_config(config).layout
    except decoder.NotBuildable:
        return None  # the blocks are still shown; their parts are found when a model is loaded


def describe(config: dict) -> dict:
    """Tiles, layer list (every module of each block in the order it runs, the hook points on
    the modules whose outputs they are) and config summary."""
    model_type = str(config.get("model_type"))
    layout = _layout(config)
    model = meta_model(config)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    blocks_path, blocks = (layout.blocks_path, decoder.get_module(model, layout.blocks_path)) if layout else \
        decoder.model_blocks(model)  # fmt: skip
    hidden = int(_first(config, "hidden_size", "n_embd", default=getattr(text, "hidden_size", 0)))
    heads = int(_first(config, "num_attention_heads", "n_head", default=getattr(text, "num_attention_heads", 1)))
    kv_heads = int(_first(config, "num_key_value_heads", default=heads) or heads)
    head_dim = int(_first(config, "head_dim", default=hidden // heads if heads else 0) or hidden // heads)
    intermediate = int(_first(config, "intermediate_size", "n_inner", default=4 * hidden) or 4 * hidden)
    vocab = int(_first(config, "vocab_size", default=getattr(text, "vocab_size", 0)))
    embedding = model.get_input_embeddings()
    embedding_path = _name_of(model, embedding)
    layers = [
        {"index": 0, "name": "Embedding", "detail": f"Shape: {vocab:,} × {hidden}", "path": embedding_path,
         "shape": list(embedding.weight.shape)},
    ]  # fmt: skip
    parallel = layout.parallel if layout else None
    moe = _moe(config, hidden)
    for i, block in enumerate(blocks):
        path = f"{blocks_path}.{i}"
        part = _block_layout(layout, block, i)
        layers.append(_block_row(i, path, block, part, parallel, heads, head_dim, hidden, intermediate, moe,
                                 _attention_kind(config, i)))  # fmt: skip
    parent_path, _, _ = blocks_path.rpartition(".")
    parent = decoder.get_module(model, parent_path) if parent_path else model
    after = list(parent.named_children())
    names = [n for n, _ in after]
    tail = after[names.index(blocks_path.rpartition(".")[2]) + 1 :] if blocks_path.rpartition(".")[2] in names else []
    for name, module in tail:
        if "norm" in f"{name} {type(module).__name__}".lower():
            full = f"{parent_path}.{name}" if parent_path else name
            layers.append({"index": len(layers), "name": type(module).__name__, "detail": f"Shape: {hidden}", "path": full})
    head = model.get_output_embeddings()
    if head is not None:
        layers.append(
            {"index": len(layers), "name": "Output", "detail": f"Shape: {hidden} × {vocab:,}", "path": _name_of(model, head),
             "tied": head.weight is embedding.weight}
        )  # fmt: skip
    first_block = next((layer for layer in layers if "block" in layer), None)
    return {
        "architecture": model_type,
        "diagram": block_diagram(first_block, parallel) if first_block else None,
        "tiles": {"layers": len(blocks), "hidden": hidden, "heads": heads, "parameters": sum(p.numel() for p in model.parameters())},
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "parallel": parallel,
        "layers": layers,
        "summary": {
            "vocab_size": vocab,
            "max_position": _first(config, "max_position_embeddings", "n_positions"),
            "mlp_ratio": round(intermediate / hidden, 2) if hidden else None,
            "architecture": model_type,
            # Mixture of experts: the experts' own width and routing, not the dense size.
            "experts": moe["text"] if moe else None,
            "expert_ratio": round(moe["width"] / hidden, 2) if moe and hidden else None,
            "attention": _attention_summary(config),
            "softcaps": ", ".join(f"{label} {value:g}" for label, value in (("attention logits", config.get("attn_logit_softcapping")),
                                  ("final logits", config.get("final_logit_softcapping"))) if value) or None,
            "blocks": "parallel (attention and MLP both read the block's input)" if parallel else
                      "sequential" if parallel is False else "unknown until loaded",
        },
    }  # fmt: skip


def block_diagram(row: dict, parallel: bool | None) -> dict:
    """What the viewer draws for this family's block: each branch's modules in the order they
    run (input norm, the sublayer, any post-norm and residual multiplier) and where the three
    hooks read: each branch's hook is what it adds to the stream, after its post-norm."""
    branches: dict[str, list[str]] = {"attention": [], "mlp": []}
    current = None
    scales = {}
    for sub in row["submodules"]:
        hooks = [h["name"] for h in sub["hooks"]]
        kind = sub["kind"]
        if kind.startswith("Post-attention"):
            branches["attention"].append(kind.replace("Post-attention ", ""))
            continue
        if kind.startswith("Post-MLP"):
            branches["mlp"].append(kind.replace("Post-MLP ", ""))
            continue
        if kind in ("Dropout", "Module"):
            continue
        if "attention" in hooks or kind == "Attention":
            current = "attention"
        elif "mlp" in hooks or kind.startswith("MLP"):
            current = "mlp"
        elif "Norm" in kind:  # an input norm: it opens the next branch
            target = "attention" if not branches["attention"] else "mlp"
            branches[target].append(kind)
            continue
        if current:
            label = "Attention" if current == "attention" else kind
            branches[current].append(label)
            for h in sub["hooks"]:
                if "×" in h["description"]:
                    scales[current] = h["description"].rsplit("× ", 1)[1].split(" ")[0]
    for name, scale in scales.items():
        branches[name].append(f"× {scale}")
    return {"parallel": bool(parallel), "attention": " → ".join(branches["attention"]), "mlp": " → ".join(branches["mlp"])}


def _block_layout(layout, block, i: int):
    """The discovered parts for block i: the tiny model's block of the same kind (its
    children's paths exist in this block), else None."""
    if layout is None:
        return None
    candidates = [layout.blocks[min(i, len(layout.blocks) - 1)], *layout.blocks]
    for part in candidates:
        try:
            decoder.get_module(block, part.attention.path)
            decoder.get_module(block, part.mlp.path)
        except (AttributeError, IndexError):
            continue
        return part
    return None


def _moe(config: dict, hidden: int) -> dict | None:
    """A mixture-of-experts config's experts: how many, how many each token is routed to,
    each expert's width (moe_intermediate_size, not the dense intermediate_size), and a
    shared expert where there is one."""
    experts = _first(config, "num_experts", "num_local_experts", "n_routed_experts")
    if not experts:
        return None
    top_k = _first(config, "num_experts_per_tok", "num_experts_per_token", "moe_top_k")
    width = int(_first(config, "moe_intermediate_size", "expert_intermediate_size", "intermediate_size", default=4 * hidden))
    shared = _first(config, "shared_expert_intermediate_size")
    text = f"{experts} experts, top-{top_k} routing, each {hidden} → {width} → {hidden}" if top_k else \
        f"{experts} experts, each {hidden} → {width} → {hidden}"  # fmt: skip
    if shared:
        text += f", plus a shared expert {hidden} → {shared} → {hidden}"
    return {"experts": int(experts), "top_k": top_k, "width": width, "text": text}


def _attention_kind(config: dict, i: int) -> str:
    """Block i's attention: full, or a sliding window (Gemma 2's alternation and its kin
    name each layer in `layer_types`; older configs only give `sliding_window`)."""
    types = config.get("layer_types")
    window = config.get("sliding_window")
    if isinstance(types, list) and i < len(types):
        return f"sliding window of {window:,}" if "sliding" in str(types[i]) and window else "full"
    return ""


def _attention_summary(config: dict) -> str | None:
    types = config.get("layer_types")
    if not isinstance(types, list) or not any("sliding" in str(t) for t in types):
        return None
    sliding = sum("sliding" in str(t) for t in types)
    window = config.get("sliding_window")
    return (f"{sliding} of {len(types)} layers attend within a sliding window"
            + (f" of {window:,} tokens" if window else "") + f", {len(types) - sliding} attend to every earlier token")


def _block_row(i, path, block, part, parallel, heads, head_dim, hidden, intermediate, moe=None, attention="") -> dict:
    roles = {}
    if part is not None:
        roles[part.attention.path] = ("attention", part.attention.scale)
        roles[part.mlp.path] = ("mlp", part.mlp.scale)
    children = dict(block.named_children())
    ordered = [n for n in (part.order if part else ()) if n in children] + [n for n in children if not part or n not in part.order]
    submodules, block_experts = [], None
    for name in ordered:
        module = children[name]
        hooks = []
        role = None
        for hook_path, (hook, scale) in roles.items():
            if hook_path == name or hook_path.startswith(name + "."):
                role = hook
                where = "" if hook_path == name else f" (the output of {hook_path})"
                times = f", × {scale:g} (the block's residual multiplier)" if scale != 1.0 else ""
                hooks.append({"name": hook, "description": HOOK_DESCRIPTIONS[hook] + where + times})
        kind = _kind(name, type(module).__name__, role, part.attention.path if part else "", part.mlp.path if part else "")
        entry = {"kind": kind, "path": f"{path}.{name}", "type": type(module).__name__,
                 "parameters": _parameter_shapes(module), "hooks": hooks}  # fmt: skip
        experts = _experts(module) if kind == "MLP" else None
        if experts:
            entry["experts"] = experts
            entry["kind"] = f"MLP ({experts} experts)"
            block_experts = experts
        submodules.append(entry)
    arrangement = " | parallel block" if parallel else ""
    # This block's MLP as it is: its experts (a model may mix dense and expert layers), else dense.
    mlp = moe["text"] if moe and block_experts else f"{hidden} → {intermediate} → {hidden}"
    attention_text = f"{heads} heads × {head_dim} dims" + (f", {attention}" if attention else "")
    return {
        "index": i + 1,
        "label": f"L{i}",  # as the extraction dialog names it
        "block": i,
        "name": f"TransformerBlock_{i}",
        "detail": f"Attention: {attention_text} | MLP: {mlp}{arrangement}",
        "path": path,
        "type": type(block).__name__,
        "hooks": [{"name": "residual", "path": path, "description": HOOK_DESCRIPTIONS["residual"]}],
        "submodules": submodules,
    }
