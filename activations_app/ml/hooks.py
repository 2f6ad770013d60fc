"""Forward hooks on a decoder-only model, at the modules `models_app.ml.decoder` finds.

`residual` is the output of decoder block i (the residual stream after it); `attention` and
`mlp` are exactly what those sublayers add to the stream: the output of the module that
holds each part (a post-norm where the block has one), times the block's residual
multiplier where it has one. Handles are removed in `finally`, even when the forward pass
raised (or was stopped early on purpose)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from mistudio.errors import JobError
from models_app.ml import decoder

from .writer import file_stem

HOOK_TYPES = decoder.HOOK_TYPES
Capture = Callable[[int, str, "torch.Tensor"], None]  # noqa: F821


class StopForward(Exception):
    """Raised by the hook on the deepest requested block: nothing after it (later blocks,
    final norm, LM head) runs."""


def _tensor(output):
    return output[0] if isinstance(output, tuple) else output


@dataclass(frozen=True)
class HookTargets:
    """The modules one run hooks, found (and the request checked against the model) once."""

    captures: list[tuple[int, str, object, float]]  # (layer, hook, module, scale) for every requested capture
    last_block: object  # the deepest requested block: the forward pass can stop after it
    paths: dict[str, str]  # "layer_{i}_{hook}" -> the module path whose output it is


def hook_targets(model, layers: list[int], hooks: list[str], probe=None, only: set[str] | None = None) -> HookTargets:
    """Every requested capture's module, refused before anything runs. The blocks' parts are
    found on this very model (one short probe pass through blocks 0..the deepest captured).
    `only`: the captures ("layer_{i}_{hook}") to run, of the request checked whole (the rest
    are reused from files already on disk); the pass then stops after the deepest of them."""
    unknown = sorted(set(hooks) - set(HOOK_TYPES))
    if unknown:
        raise JobError("invalid_hooks", f"Unknown hook type(s) {unknown}; choose from {', '.join(HOOK_TYPES)}.")
    if not layers or not hooks:
        raise JobError("invalid_layers" if not layers else "invalid_hooks", "Choose at least one layer and one hook type.")
    if len(set(layers)) != len(layers) or len(set(hooks)) != len(hooks):
        raise JobError("invalid_layers", "Each layer and each hook type may be chosen once.")
    path, blocks = decoder.model_blocks(model)
    bad = [layer for layer in layers if not 0 <= layer < len(blocks)]
    if bad:
        raise JobError("invalid_layers", f"Layers {bad} are out of range: the model has layers 0–{len(blocks) - 1}.")
    wanted = [(layer, hook) for layer in layers for hook in hooks if only is None or file_stem(layer, hook) in only]
    if not wanted:
        raise JobError("invalid_hooks", "Nothing is left to capture: every requested file is reused.")
    deepest = max(layer for layer, _ in wanted)
    layout = decoder.discover(model, probe, upto=deepest, blocks=(path, blocks))
    captures, paths = [], {}
    for layer in sorted({layer for layer, _ in wanted}, key=layers.index):
        parts = {hook: (module, scale) for hook, module, scale in decoder.parts_of(blocks[layer], layout.blocks[layer])}
        for hook in [hook for wanted_layer, hook in wanted if wanted_layer == layer]:
            module, scale = parts[hook]
            captures.append((layer, hook, module, scale))
            part = None if hook == "residual" else layout.part(layer, hook)
            paths[file_stem(layer, hook)] = f"{path}.{layer}" + (f".{part.path}" if part else "")
    return HookTargets(captures, blocks[deepest], paths)


@contextmanager
def capture_activations(targets: HookTargets, on_capture: Capture, stop_after_last: bool = True) -> Iterator[None]:
    """Calls `on_capture(layer, hook, tensor)` during each forward pass (the tensor times the
    part's multiplier); with `stop_after_last`, the pass raises StopForward once the
    deepest requested block ran."""
    handles = []
    try:
        for layer, hook, module, scale in targets.captures:

            def capture(_m, _i, out, layer=layer, hook=hook, scale=scale):
                tensor = _tensor(out)
                on_capture(layer, hook, tensor * scale if scale != 1.0 else tensor)

            handles.append(module.register_forward_hook(capture))
        if stop_after_last:

            def stop(_module, _inputs, _output):
                raise StopForward()

            # Registered last, so the captures on the same block run before it.
            handles.append(targets.last_block.register_forward_hook(stop))
        yield
    finally:
        for handle in handles:
            handle.remove()
