"""Forward hooks on a decoder-only model, at the modules the architecture viewer shows.

`residual` is the output of decoder block i (the residual stream after it), `attention`
the attention module's output and `mlp` the MLP module's output, both before they are
added to the residual. Handles are removed in `finally`, even when the forward pass
raised (or was stopped early on purpose)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from mistudio.errors import JobError
from models_app.ml import module_map

HOOK_TYPES = ("residual", "mlp", "attention")
Capture = Callable[[int, str, "torch.Tensor"], None]  # noqa: F821


class StopForward(Exception):
    """Raised by the hook on the deepest requested block: nothing after it (later blocks,
    final norm, LM head) runs."""


def _tensor(output):
    return output[0] if isinstance(output, tuple) else output


@dataclass(frozen=True)
class HookTargets:
    """The modules one run hooks, found (and the request checked against the model) once."""

    captures: list[tuple[int, str, object]]  # (layer, hook, module) for every requested capture
    last_block: object  # the deepest requested block: the forward pass can stop after it


def hook_targets(model, model_type: str, layers: list[int], hooks: list[str]) -> HookTargets:
    """Every requested capture's module, refused before anything runs."""
    mapping = module_map(model_type)
    blocks = model
    for part in mapping.blocks.split("."):
        blocks = getattr(blocks, part)
    unknown = sorted(set(hooks) - set(HOOK_TYPES))
    if unknown:
        raise JobError("invalid_hooks", f"Unknown hook type(s) {unknown}; choose from {', '.join(HOOK_TYPES)}.")
    if not layers or not hooks:
        raise JobError("invalid_layers" if not layers else "invalid_hooks", "Choose at least one layer and one hook type.")
    if len(set(layers)) != len(layers) or len(set(hooks)) != len(hooks):
        raise JobError("invalid_layers", "Each layer and each hook type may be chosen once.")
    bad = [layer for layer in layers if not 0 <= layer < len(blocks)]
    if bad:
        raise JobError("invalid_layers", f"Layers {bad} are out of range: the model has layers 0–{len(blocks) - 1}.")
    captures = []
    for layer in layers:
        block = blocks[layer]
        for hook in hooks:
            module = {"residual": block, "attention": getattr(block, mapping.attention), "mlp": getattr(block, mapping.mlp)}[hook]
            captures.append((layer, hook, module))
    return HookTargets(captures, blocks[max(layers)])


@contextmanager
def capture_activations(targets: HookTargets, on_capture: Capture, stop_after_last: bool = True) -> Iterator[None]:
    """Calls `on_capture(layer, hook, tensor)` during each forward pass; with
    `stop_after_last`, the pass raises StopForward once the deepest requested block ran."""
    handles = []
    try:
        for layer, hook, module in targets.captures:
            handles.append(
                module.register_forward_hook(lambda _m, _i, out, layer=layer, hook=hook: on_capture(layer, hook, _tensor(out)))
            )
        if stop_after_last:

            def stop(_module, _inputs, _output):
                raise StopForward()

            # Registered last, so the captures on the same block run before it.
            handles.append(targets.last_block.register_forward_hook(stop))
        yield
    finally:
        for handle in handles:
            handle.remove()
