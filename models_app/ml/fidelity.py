"""Fidelity by layer: how far a model's activations are from a reference model's on the
shipped text (the perplexity text, in the same windows), block by block and hook by hook
(residual, attention, MLP, exactly where the extraction reads them), and at the output
(the next-token distribution).

One model is held at a time: `record` runs the reference and writes what it saw to a folder
(every hook's activations and the output log-probabilities, in float16: the comparison is at
float16's resolution, both sides rounded alike, so a model compared with itself is exact);
`compare` then runs the other model and measures it against that folder, one window at a
time. Position 0 of every window is left out (an attention sink whose activations are
orders of magnitude off the rest), and so is any BOS token, as in the extraction's
statistics. Django-free."""

from __future__ import annotations

import json
import math
from pathlib import Path

from . import decoder
from .quality import WINDOW_TOKENS, text_ids, windows

HOOKS = ("residual", "attention", "mlp")
FORMAT_VERSION = 1
FLOAT16_MAX = 65504.0


def _kept(chunk, bos_id):
    """Positions compared in one window: all but the first, and never a BOS token."""
    import torch

    keep = torch.ones(len(chunk), dtype=torch.bool)
    keep[0] = False
    if bos_id is not None:
        keep &= chunk != bos_id
    return keep


class _Capture:
    """Forward hooks on every block's three parts: each window's activations by (layer, hook)."""

    def __init__(self, model) -> None:
        path, blocks = decoder.model_blocks(model)
        layout = decoder.discover(model, blocks=(path, blocks))
        self.layers = len(blocks)
        self.seen: dict[tuple[int, str], object] = {}
        self.handles = []
        for layer, block in enumerate(blocks):
            for hook, module, scale in decoder.parts_of(block, layout.blocks[layer]):

                def capture(_m, _i, out, key=(layer, hook), scale=scale):
                    tensor = out[0] if isinstance(out, tuple) else out
                    self.seen[key] = (tensor * scale if scale != 1.0 else tensor).detach()

                self.handles.append(module.register_forward_hook(capture))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _passes(model, tokenizer, max_tokens: int | None, window: int, on_window=None):
    """Each window's (kept positions, {(layer, hook): float32 [kept, d]}, log-probs float32
    [kept, vocab] of the next token, negative log-likelihood sum and count), in order."""
    import torch

    chunks = windows(text_ids(tokenizer, max_tokens), window)
    bos = getattr(tokenizer, "bos_token_id", None)
    device = next(model.parameters()).device
    capture = _Capture(model)
    model.eval()
    try:
        with torch.no_grad():  # quanto's int2 forward (Q2 models made before HQQ) fails under inference_mode
            for done, chunk in enumerate(chunks, 1):
                capture.seen.clear()
                logits = model(chunk.unsqueeze(0).to(device), use_cache=False).logits[0].float()
                keep = _kept(chunk, bos).to(logits.device)
                nll = torch.nn.functional.cross_entropy(logits[:-1], chunk[1:].to(logits.device), reduction="sum").item()
                acts = {key: value[0].float()[keep] for key, value in capture.seen.items()}
                # The distribution at each kept position (over the next token).
                logprobs = torch.log_softmax(logits[keep], dim=-1)
                yield acts, logprobs, nll, len(chunk) - 1, capture.layers
                if on_window:
                    on_window(done, len(chunks))
    finally:
        capture.close()


def _half(tensor):
    """Float16 (the stored resolution), values past its range clipped to it."""
    return tensor.clamp(-FLOAT16_MAX, FLOAT16_MAX).half()


def record(model, tokenizer, folder: Path, max_tokens: int | None = None, window: int = WINDOW_TOKENS,
           on_window=None) -> dict:  # fmt: skip
    """Run the reference model on the shipped text and write what every hook and the output
    saw to `folder` (one .npy per window and hook, float16); returns what was written
    (tokens compared, layers, the reference's perplexity)."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    nll_sum, counted, kept, windows, layers = 0.0, 0, 0, 0, 0
    for n, (acts, logprobs, nll, count, layers) in enumerate(_passes(model, tokenizer, max_tokens, window, on_window)):
        for (layer, hook), value in acts.items():
            np.save(folder / f"w{n}_l{layer}_{hook}.npy", _half(value).cpu().numpy())
        np.save(folder / f"w{n}_logprobs.npy", _half(logprobs).cpu().numpy())
        nll_sum, counted, kept, windows = nll_sum + nll, counted + count, kept + len(logprobs), n + 1
    info = {"version": FORMAT_VERSION, "windows": windows, "tokens": kept, "layers": layers, "window": window,
            "max_tokens": max_tokens, "perplexity": math.exp(nll_sum / counted) if counted else None,
            "bytes": sum(path.stat().st_size for path in folder.glob("*.npy"))}  # fmt: skip
    (folder / "reference.json").write_text(json.dumps(info))
    return info


def recorded(folder: Path, max_tokens: int | None = None, window: int = WINDOW_TOKENS) -> dict | None:
    """What `record` wrote to `folder` for this text and these windows, or None."""
    try:
        info = json.loads((folder / "reference.json").read_text())
    except (OSError, ValueError):
        return None
    same = info.get("version") == FORMAT_VERSION and info.get("window") == window and info.get("max_tokens") == max_tokens
    return info if same else None


def recorded_bytes(folder: Path) -> int:
    """What a recording takes on disk, as `record` wrote it down (0 when there is none)."""
    try:
        return int(json.loads((folder / "reference.json").read_text()).get("bytes") or 0)
    except (OSError, ValueError):
        return 0


class _Sums:
    """Running sums of one (layer, hook)'s comparison."""

    def __init__(self) -> None:
        self.cosine = self.rel_error = self.error_sq = 0.0
        self.tokens = 0
        self.ref_sum = self.ref_sq = None

    def add(self, q, r) -> None:
        import torch

        q, r = q.double(), r.double()
        norm_q, norm_r = q.norm(dim=-1), r.norm(dim=-1)
        both = (norm_q > 0) & (norm_r > 0)
        cosine = torch.where(both, (q * r).sum(-1) / (norm_q * norm_r).clamp_min(1e-300), (norm_q == norm_r).double())
        diff = (q - r).norm(dim=-1)
        rel = torch.where(norm_r > 0, diff / norm_r.clamp_min(1e-300), (diff > 0).double())
        self.cosine += cosine.sum().item()
        self.rel_error += rel.sum().item()
        self.error_sq += (diff**2).sum().item()
        self.tokens += len(q)
        self.ref_sum = r.sum(0) if self.ref_sum is None else self.ref_sum + r.sum(0)
        self.ref_sq = (r**2).sum().item() + (self.ref_sq or 0.0)

    def result(self) -> dict:
        # Variance of the reference around its own mean, summed over dimensions and tokens.
        total = self.ref_sq - (self.ref_sum**2).sum().item() / self.tokens
        fvu = self.error_sq / total if total > 0 else (0.0 if self.error_sq == 0 else math.inf)
        return {"cosine": self.cosine / self.tokens, "rel_error": self.rel_error / self.tokens, "fvu": fvu}


def compare(model, tokenizer, folder: Path, max_tokens: int | None = None, window: int = WINDOW_TOKENS,
            on_window=None) -> dict:  # fmt: skip
    """Run `model` on the same windows and measure it against the reference in `folder`:
    per layer and hook the mean cosine similarity per token, the mean relative error
    ‖q − r‖ / ‖r‖ and the fraction of variance unexplained; at the output the mean KL
    divergence KL(reference ‖ model) of the next-token distribution and the top-1 agreement;
    and this model's perplexity (from the same pass)."""
    import numpy as np
    import torch

    info = recorded(folder, max_tokens, window)
    if info is None:
        raise FileNotFoundError(f"no reference recorded in {folder}")
    sums: dict[tuple[int, str], _Sums] = {}
    kl_sum, agree, kept, nll_sum, counted, layers = 0.0, 0, 0, 0.0, 0, 0
    for n, (acts, logprobs, nll, count, layers) in enumerate(_passes(model, tokenizer, max_tokens, window, on_window)):
        if layers != info["layers"]:
            raise ValueError(f"the model has {layers} layers, the reference {info['layers']}")
        for key, value in acts.items():
            reference = torch.from_numpy(np.load(folder / f"w{n}_l{key[0]}_{key[1]}.npy")).float()
            if reference.shape != value.shape:
                raise ValueError(f"layer {key[0]} {key[1]}: shape {tuple(value.shape)} here, {tuple(reference.shape)} in the reference")
            sums.setdefault(key, _Sums()).add(_half(value).float().cpu(), reference)
        ref_lp = torch.from_numpy(np.load(folder / f"w{n}_logprobs.npy")).float()
        if ref_lp.shape != logprobs.shape:
            raise ValueError(f"output: vocabulary {logprobs.shape[-1]} here, {ref_lp.shape[-1]} in the reference")
        own = _half(logprobs).float().cpu()
        kl_sum += (ref_lp.exp() * (ref_lp - own)).sum(-1).clamp_min(0).sum().item()
        agree += (ref_lp.argmax(-1) == own.argmax(-1)).sum().item()
        kept, nll_sum, counted = kept + len(own), nll_sum + nll, counted + count
    table = [{"layer": layer, **{hook: sums[(layer, hook)].result() for hook in HOOKS}} for layer in range(layers)]
    return {"tokens": kept, "windows": info["windows"], "layers": table,
            "output": {"kl": kl_sum / kept if kept else None, "top1": agree / kept if kept else None},
            "perplexity": math.exp(nll_sum / counted) if counted else None,
            "reference_perplexity": info.get("perplexity")}  # fmt: skip


def weakest(result: dict, hooks=HOOKS) -> tuple[int, str, float] | None:
    """(layer, hook, cosine) of the lowest cosine in a comparison."""
    found = [(row["layer"], hook, row[hook]["cosine"]) for row in result.get("layers", []) for hook in hooks if hook in row]
    return min(found, key=lambda item: item[2]) if found else None


def first_below(result: dict, threshold: float) -> tuple[int, str, float] | None:
    """The first (layer, hook, cosine) below `threshold`, by depth."""
    for row in result.get("layers", []):
        for hook in HOOKS:
            if row[hook]["cosine"] < threshold:
                return row["layer"], hook, row[hook]["cosine"]
    return None
