"""Where a decoder-only model's residual stream and its two sublayers are, found from the
model itself rather than from a hand-written map per family.

Definitions (the contract's, and the architecture viewer's):
- `residual[i]` is the stream after block i (the block's output);
- `attention[i]` and `mlp[i]` are exactly what that sublayer *adds* to the stream, after
  any post-norm (Gemma 2/3, OLMo 2) or residual multiplier (Granite) the block applies.

So `residual[i] == residual[i-1] + attention[i] + mlp[i]` (with `residual[-1]` the
embedding output as block 0 receives it), sequential or parallel blocks alike.

How the parts are found: one short probe forward pass records the output of every module
inside every block. For each block, the pair of those outputs (A, M), with A computed before
M, and the two scalars (a, m) that best solve `out - in = a·A + m·M` are the sublayers
and their multipliers, when the fit is exact to float rounding. A block with no such pair
(a convolution or state-space mixer, a gated residual) is refused, with what it holds."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from mistudio.errors import JobError

HOOK_TYPES = ("residual", "mlp", "attention")
_PASSTHROUGH = ("Dropout", "Identity")


@dataclass(frozen=True)
class Part:
    """One sublayer's contribution: the output of `path` (relative to its block) times `scale`."""

    path: str
    type: str
    scale: float = 1.0


@dataclass(frozen=True)
class BlockLayout:
    attention: Part
    mlp: Part
    order: tuple[str, ...] = ()  # the block's direct children, in the order they ran


@dataclass(frozen=True)
class DecoderLayout:
    blocks_path: str  # dotted path of the ModuleList of decoder blocks
    blocks: list[BlockLayout]
    parallel: bool | None = None  # the MLP reads the block's input, not the stream after attention

    def part(self, layer: int, hook: str) -> Part:
        return getattr(self.blocks[layer], hook)


def get_module(root, dotted: str):
    for name in dotted.split(".") if dotted else ():
        root = getattr(root, name) if not name.isdigit() else root[int(name)]
    return root


def find_blocks(model, num_layers: int | None = None) -> tuple[str, object]:
    """The ModuleList of decoder blocks: the largest (by parameters) ModuleList not nested in
    another, of `num_layers` entries when the config says how many."""
    import torch

    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if num_layers is not None and len(module) != num_layers:
            continue
        if any(name.startswith(outer + ".") for outer, _ in candidates):
            continue
        candidates.append((name, module))
    if not candidates:
        raise JobError("unsupported_architecture", f"{type(model).__name__} has no list of {num_layers or ''} decoder blocks.")
    return max(candidates, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


def _first_tensor(output):
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _block_input(args, kwargs):
    if args and hasattr(args[0], "shape"):
        return args[0]
    return kwargs.get("hidden_states")


class _Probe:
    """Hooks that record, for the blocks asked, each block's input and output and every
    inner module's output that has the stream's shape (cloned: some blocks add in place)."""

    def __init__(self, blocks, indices) -> None:
        self.blocks = blocks
        self.indices = list(indices)
        self.inputs: dict[int, object] = {}
        self.outputs: dict[int, object] = {}
        self.inner: dict[int, dict[str, list]] = {i: {} for i in self.indices}
        self.order: dict[int, list[str]] = {i: [] for i in self.indices}
        self.types: dict[int, dict[str, str]] = {i: {} for i in self.indices}
        self.handles = []

    def __enter__(self):
        for i in self.indices:
            block = self.blocks[i]
            self.handles.append(block.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._post(i)))
            for name, module in block.named_modules():
                if name:
                    self.types[i][name] = type(module).__name__
                    self.handles.append(module.register_forward_hook(self._inner(i, name)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def _pre(self, i):
        def hook(_module, args, kwargs):
            self.inputs[i] = _block_input(args, kwargs).detach().clone()

        return hook

    def _post(self, i):
        def hook(_module, _inputs, output):
            self.outputs[i] = _first_tensor(output).detach().clone()

        return hook

    def _inner(self, i, name):
        def hook(_module, _inputs, output):
            tensor = _first_tensor(output)
            if tensor is None:
                return
            calls = self.inner[i].setdefault(name, [])
            calls.append(tensor.detach().clone())
            if len(calls) == 1:
                self.order[i].append(name)

        return hook


def _depth(name: str) -> int:
    return name.count(".")


def _solve_block(probe: _Probe, i: int, tolerance: float) -> BlockLayout | str:
    """The block's two parts, or why it has none."""
    import torch

    x, y = probe.inputs.get(i), probe.outputs.get(i)
    if x is None or y is None or x.shape != y.shape:
        return "its output is not a stream of the shape it reads"
    delta = (y - x).double().flatten()
    scale = float(delta.norm())
    if not math.isfinite(scale) or scale == 0:
        return "it adds nothing to the stream on the probe"
    # Candidates: modules called once, with the stream's shape, not negligible; among
    # modules whose outputs are equal (a module and its output projection or dropout), the
    # outermost real one speaks for them.
    kept: list[tuple[str, torch.Tensor]] = []
    for name in probe.order[i]:
        calls = probe.inner[i][name]
        # Some blocks flatten the tokens for their MoE and view them back (Llama 4).
        if len(calls) != 1 or calls[0].numel() != y.numel() or calls[0].shape[-1] != y.shape[-1]:
            continue
        value = calls[0].double().flatten()
        if float(value.norm()) <= 1e-6 * scale:
            continue
        twin = next((k for k, (other, v) in enumerate(kept) if torch.allclose(v, value, rtol=1e-6, atol=1e-9 * scale)), None)
        if twin is None:
            kept.append((name, value))
        elif _better_name(name, kept[twin][0], probe.types[i]):
            kept[twin] = (name, value)
    best = None
    for a in range(len(kept)):
        for b in range(a + 1, len(kept)):
            basis = torch.stack([kept[a][1], kept[b][1]], dim=1)
            solution = torch.linalg.lstsq(basis, delta.unsqueeze(1)).solution.squeeze(1)
            residual = float((basis @ solution - delta).norm()) / scale
            if abs(float(solution[0])) < 1e-3 or abs(float(solution[1])) < 1e-3:
                continue
            if best is None or residual < best[0]:
                best = (residual, a, b, solution)
    if best is None or best[0] > tolerance:
        inner = ", ".join(f"{name} ({probe.types[i][name]})" for name in probe.order[i] if "." not in name)
        return f"no two of its sublayers add up to what it adds to the stream (it holds {inner or 'no modules'})"
    _, a, b, solution = best
    first, second = kept[a][0], kept[b][0]
    if _looks_like_attention(second, probe.types[i]) and not _looks_like_attention(first, probe.types[i]):
        first, second, solution = second, first, solution.flip(0)
    # The token-mixing part must be attention: a convolution or state-space mixer (LFM2's
    # conv blocks, Jamba's Mamba layers) also adds to the stream, but is not what the
    # hooks promise. It is attention when it, or a module run before it in the block, is.
    before = probe.order[i][: probe.order[i].index(first) + 1]
    if not any(_looks_like_attention(name, probe.types[i]) for name in before):
        mixer = next((n for n in before if "." not in n and not probe.types[i][n].endswith(("Norm", "LayerNorm"))), first)
        return f"it mixes tokens with {mixer} ({probe.types[i][mixer]}), not attention"
    return BlockLayout(
        attention=Part(first, probe.types[i][first], _round_scale(float(solution[0]))),
        mlp=Part(second, probe.types[i][second], _round_scale(float(solution[1]))),
        order=tuple(n for n in probe.order[i] if "." not in n),
    )


def _round_scale(value: float) -> float:
    """The multiplier the block applies, as its config writes it: the fit gives it to float
    rounding (0.2199999993 for Granite's 0.22; 1.0 for every other family)."""
    if abs(value - 1.0) < 1e-4:
        return 1.0
    short = float(f"{value:.6g}")
    return short if abs(short - value) <= 1e-6 * abs(value) else value


def _better_name(name: str, current: str, types: dict[str, str]) -> bool:
    """Of two modules with the same output, the one to name: not a dropout, then the outermost."""
    passthrough = types[name].endswith(_PASSTHROUGH), types[current].endswith(_PASSTHROUGH)
    if passthrough[0] != passthrough[1]:
        return passthrough[1]
    return _depth(name) < _depth(current)


def _looks_like_attention(name: str, types: dict[str, str]) -> bool:
    text = f"{name} {types[name]}".lower()
    return "attn" in text or "attention" in text


def probe_ids(vocab_size: int, length: int = 12, rows: int = 2):
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, max(4, min(vocab_size, 1000)), (rows, length), generator=generator)


def model_blocks(model) -> tuple[str, object]:
    """The dotted path and ModuleList of a loaded model's decoder blocks."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return find_blocks(model, getattr(config, "num_hidden_layers", None))


def discover(model, ids=None, upto: int | None = None, tolerance: float | None = None, blocks=None) -> DecoderLayout:
    """The layout of a loaded model, from one probe forward pass (blocks 0..upto).
    `blocks`: model_blocks(model), when the caller found them already."""
    import torch

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    path, blocks = blocks or model_blocks(model)
    last = len(blocks) - 1 if upto is None else upto
    if ids is None:
        ids = probe_ids(int(getattr(config, "vocab_size", 1000)))
    parameter = next(model.parameters())
    if tolerance is None:
        tolerance = 1e-4 if parameter.dtype == torch.float32 else 3e-2
    class _Enough(Exception):
        pass

    def enough(*_):
        raise _Enough

    with _Probe(blocks, range(last + 1)) as probe, torch.no_grad():
        # Registered after the probe's own hooks on that block, so they run first.
        stop = blocks[last].register_forward_hook(enough) if last < len(blocks) - 1 else None
        try:
            model(input_ids=ids.to(parameter.device), use_cache=False)
        except _Enough:
            pass
        finally:
            if stop is not None:
                stop.remove()
    layouts, refusals = [], []
    for i in range(last + 1):
        solved = _solve_block(probe, i, tolerance)
        if isinstance(solved, str):
            refusals.append((i, type(blocks[i]).__name__, solved))
        else:
            layouts.append(solved)
    if refusals:
        i, kind, why = refusals[0]
        others = f" (and {len(refusals) - 1} more block(s))" if len(refusals) > 1 else ""
        raise JobError(
            "unsupported_architecture",
            f"Block {i} ({kind}) is not an attention part plus an MLP part added to a residual stream: {why}{others}.",
        )
    return DecoderLayout(path, layouts)


def is_parallel(model, layout: DecoderLayout, ids) -> bool:
    """Whether block 0's MLP reads the block's input (parallel: GPT-NeoX, Phi, Cohere) rather
    than the stream after attention: its output does not change when attention's is zeroed."""
    import torch

    blocks = get_module(model, layout.blocks_path)
    part = layout.blocks[0]
    seen = []
    attention = get_module(blocks[0], part.attention.path)
    mlp = get_module(blocks[0], part.mlp.path)

    def record(_m, _i, output):
        seen.append(_first_tensor(output).detach().clone())

    def zero(_m, _i, output):
        tensor = _first_tensor(output)
        zeros = torch.zeros_like(tensor)
        return zeros if isinstance(output, torch.Tensor) else (zeros, *output[1:])

    handle = mlp.register_forward_hook(record)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
            stop = attention.register_forward_hook(zero)
            try:
                model(input_ids=ids, use_cache=False)
            finally:
                stop.remove()
    finally:
        handle.remove()
    return torch.allclose(seen[0], seen[1], rtol=1e-5, atol=1e-6)


# --- judging a config before any weights exist -------------------------------------------

_SIZES = {
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "intermediate_size": 128, "n_inner": 128, "ffn_hidden_size": 128,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "num_key_value_heads": 2, "n_head_kv": 2,
    "num_kv_heads": 2, "multi_query_group_num": 2, "head_dim": 16, "kv_channels": 16,
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "n_group": 1, "topk_group": 1, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "vocab_size": 512, "max_position_embeddings": 128, "n_positions": 128, "n_ctx": 128, "sliding_window": 8,
    "rotary_dim": 8, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "kv_lora_rank": 16,
    "q_lora_rank": 16, "qk_head_dim": 16, "index_head_dim": 16, "index_n_heads": 4, "index_topk": 8,
}  # fmt: skip
TINY_VOCAB = 512


_DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def _cut_layers(fields: dict, depth: int) -> None:
    """Keep one layer of each kind: every per-layer list (`layer_types`, `mlp_layer_types`,
    per-layer sizes…: a list as long as the model is deep) is cut to the same layers,
    layer-index lists and per-layer dicts are renumbered, and the depth follows."""
    per_layer = [k for k, v in fields.items() if isinstance(v, list) and len(v) == depth and depth > 1]
    signature = [tuple(json.dumps(fields[k][i], sort_keys=True, default=str) for k in per_layer) for i in range(depth)]
    firsts = list(dict.fromkeys(signature))
    kept = [signature.index(kind) for kind in firsts]
    if len(kept) < 2:
        kept = [0, 1][: min(2, depth)]
    renumber = {old: new for new, old in enumerate(kept)}
    for key in per_layer:
        fields[key] = [fields[key][i] for i in kept]
    for key, value in list(fields.items()):
        if key in per_layer:
            continue
        if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value) \
                and key.endswith(("_idxs", "_indices", "_layers", "_layer_ids", "_idx")) and max(value) < depth:
            fields[key] = [renumber[v] for v in value if v in renumber]  # full_attn_idxs, mlp_only_layers, …
        elif isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
            fields[key] = {type(k)(renumber[int(k)]) if isinstance(k, int) else str(renumber[int(k)]): v
                           for k, v in value.items() if int(k) in renumber}  # per_layer_config  # fmt: skip
    for key in _DEPTH_KEYS:
        if isinstance(fields.get(key), int):
            fields[key] = len(kept)


def tiny_config(config: dict):
    """The same architecture at toy size: every size the config names shrunk, everything
    structural (norm placement, parallel blocks, multipliers, experts) kept; per-layer
    patterns cut to one layer of each kind."""
    from transformers import AutoConfig

    model_type = config["model_type"]
    given = {k: v for k, v in config.items() if k not in {"quantization_config", "model_type", "transformers_version"}}
    # The family's defaults fill what is not said, but for per-layer lists: those follow the
    # depth the config gives (the class derives them again).
    defaults = {k: v for k, v in AutoConfig.for_model(model_type).to_dict().items() if not isinstance(v, list)}
    fields = {**defaults, **given}
    fields.pop("model_type", None)
    fields.pop("transformers_version", None)
    text = fields.get("text_config")
    if isinstance(text, dict):  # a multimodal wrapper: its language model is what we judge
        return tiny_config({**text, "model_type": text.get("model_type") or model_type})
    depth_key = next((k for k in _DEPTH_KEYS if isinstance(fields.get(k), int)), None)
    depth = fields[depth_key] if depth_key else None
    for key, value in _SIZES.items():
        if key in fields and isinstance(fields[key], int) and not isinstance(fields[key], bool):
            fields[key] = value
    if depth:
        _cut_layers(fields, depth)
    for key in [k for k in fields if k.endswith("_token_id")]:
        if isinstance(fields[key], int) and fields[key] >= TINY_VOCAB:
            fields[key] = None
        elif isinstance(fields[key], list):
            fields[key] = [t for t in fields[key] if isinstance(t, int) and t < TINY_VOCAB] or None
    fields.pop("rope_scaling", None)
    return AutoConfig.for_model(model_type, **fields)


class NotBuildable(Exception):
    """The config could not be built (or run) at toy size: it says nothing about the family,
    so the loaded model itself is judged instead."""


@dataclass(frozen=True)
class ConfigVerdict:
    layout: DecoderLayout  # found on the tiny model built from the config, where both identities held


_VERDICTS: dict[str, ConfigVerdict] = {}


def judge_config(config: dict) -> ConfigVerdict:
    """Build the config's architecture tiny and random, find its parts, and check both
    identities; refused, with the reason, when it does not fit. Cached per config."""
    key = json.dumps({k: v for k, v in config.items() if k != "_name_or_path"}, sort_keys=True, default=str)
    if key not in _VERDICTS:
        _VERDICTS[key] = _judge(config)
    return _VERDICTS[key]


def build_tiny(config: dict):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tiny = tiny_config(config)
    model = AutoModelForCausalLM.from_config(tiny, dtype=torch.float32)
    return model.eval()


def _judge(config: dict) -> ConfigVerdict:
    try:
        model = build_tiny(config)
    except Exception as exc:  # noqa: BLE001 - any failure to build says nothing of the family
        raise NotBuildable(f"{type(exc).__name__}: {exc}") from None
    ids = probe_ids(TINY_VOCAB)
    try:
        layout = discover(model, ids)
        check_causal(model, layout, ids)
        check_identities(model, layout, ids)
        parallel = is_parallel(model, layout, ids)
    except JobError:
        raise
    except Exception as exc:  # noqa: BLE001 - the toy-size model does not run (a shrunk size it needs)
        raise NotBuildable(f"the tiny model does not run: {type(exc).__name__}: {exc}") from None
    return ConfigVerdict(DecoderLayout(layout.blocks_path, layout.blocks, parallel))


def check_causal(model, layout: DecoderLayout, ids) -> None:
    """Refuse a model whose early positions see later tokens (an encoder behind a causal-LM
    class, like BERT-style LM heads without is_decoder): changing the last token must not
    change block 0's output anywhere before it."""
    import torch

    block = get_module(model, layout.blocks_path)[0]
    seen = []
    handle = block.register_forward_hook(lambda _m, _i, out: seen.append(_first_tensor(out).detach().clone()))
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % max(4, int(ids.max()) + 1)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
            model(input_ids=changed, use_cache=False)
    finally:
        handle.remove()
    before, after = seen[0][:, :-1], seen[1][:, :-1]
    if not torch.allclose(before, after, rtol=1e-5, atol=1e-6):
        raise JobError("unsupported_architecture", "Its attention is bidirectional: earlier positions see later tokens, "
                                                   "so it is an encoder, not a causal LM.")  # fmt: skip


def check_identities(model, layout: DecoderLayout, ids, tolerance: float = 1e-4) -> dict:
    """Both identities on `ids`, measured with the same hooks extraction uses: the largest
    relative error of each, or a JobError saying which failed."""
    import torch

    blocks = get_module(model, layout.blocks_path)
    captured: dict[tuple[int, str], torch.Tensor] = {}
    handles = [blocks[0].register_forward_pre_hook(
        lambda _m, args, kwargs: captured.__setitem__((-1, "residual"), _block_input(args, kwargs).detach().clone()),
        with_kwargs=True)]  # fmt: skip
    try:
        for i, block in enumerate(blocks):
            for hook, module, scale in parts_of(block, layout.blocks[i]):
                handles.append(module.register_forward_hook(
                    lambda _m, _in, out, key=(i, hook), scale=scale: captured.__setitem__(
                        key, _first_tensor(out).detach().clone() * scale)))  # fmt: skip
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    errors = {"sum": 0.0, "hidden_states": 0.0}
    for i in range(len(blocks)):
        res, prev = captured[(i, "residual")].double(), captured[(i - 1, "residual")].double()
        added = prev + captured[(i, "attention")].double().reshape(res.shape) + captured[(i, "mlp")].double().reshape(res.shape)
        errors["sum"] = max(errors["sum"], float((res - added).norm() / res.norm()))
        if i < len(blocks) - 1:
            reference = out.hidden_states[i + 1].double()
            if reference.shape != res.shape:
                raise JobError("unsupported_architecture",
                               f"Block {i}'s output ({list(res.shape)}) does not line up with transformers' hidden "
                               f"states ({list(reference.shape)}): the model adds positions of its own.")  # fmt: skip
            errors["hidden_states"] = max(errors["hidden_states"], float((res - reference).norm() / reference.norm()))
    if errors["sum"] > tolerance:
        raise JobError("unsupported_architecture",
                       f"residual[i] != residual[i-1] + attention[i] + mlp[i] (relative error {errors['sum']:.1e}).")  # fmt: skip
    if errors["hidden_states"] > tolerance:
        raise JobError("unsupported_architecture", "The blocks' outputs are not transformers' hidden_states "
                                                   f"(relative error {errors['hidden_states']:.1e}).")  # fmt: skip
    return errors


def parts_of(block, layout: BlockLayout):
    """(hook, module, scale) for the three captures of one block."""
    return [
        ("residual", block, 1.0),
        ("attention", get_module(block, layout.attention.path), layout.attention.scale),
        ("mlp", get_module(block, layout.mlp.path), layout.mlp.scale),
    ]
