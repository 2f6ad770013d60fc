"""The quality figure: perplexity on a fixed English text shipped with the project
(original prose, about 2,300 SmolLM2 tokens), the same for every format so they compare."""

from __future__ import annotations

import math
from pathlib import Path

REFERENCE_TEXT = Path(__file__).with_name("data") / "perplexity_text.txt"
WINDOW_TOKENS = 512


def perplexity(model, tokenizer, text: str | None = None, window: int = WINDOW_TOKENS, max_tokens: int | None = None,
               on_window=None) -> float:  # fmt: skip
    """exp(mean negative log-likelihood) over every token after the first of each window,
    in non-overlapping windows (each scored with no context from the previous one); over
    the text's first `max_tokens` tokens when given (MISTUDIO_PERPLEXITY_TOKENS: the test
    suite scores one window, a fifth of the work; every figure of one run uses the same).
    `on_window(done, total)` after each window."""
    import torch

    chunks = windows(text_ids(tokenizer, max_tokens, text), window)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    model.eval()
    with torch.no_grad():  # quanto's int2 forward (Q2 models made before HQQ) fails under inference_mode
        for done, ids in enumerate(chunks, 1):
            chunk = ids.unsqueeze(0).to(device)
            logits = model(chunk).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
            total_nll += nll.item()
            total_tokens += chunk.shape[1] - 1
            if on_window:
                on_window(done, len(chunks))
    return math.exp(total_nll / total_tokens)


def text_ids(tokenizer, max_tokens: int | None = None, text: str | None = None):
    """The shipped text's tokens (or `text`'s), no special tokens, cut to `max_tokens` when given."""
    text = REFERENCE_TEXT.read_text() if text is None else text
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    return ids[:max_tokens] if max_tokens else ids


def windows(ids, window: int = WINDOW_TOKENS) -> list:
    """Non-overlapping windows of `ids`, each of two tokens at least (one to predict)."""
    return [ids[start : start + window] for start in range(0, len(ids) - 1, window) if len(ids[start : start + window]) >= 2]
