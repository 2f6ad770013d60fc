"""Tokenization for an extraction: the dataset's texts as fixed windows of token ids (packed
or one row per document), with the BOS policy SAELens and TransformerLens follow, and which
positions the statistics count."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from mistudio.errors import JobError

TOKENIZATIONS = {"packed": "packed (documents joined into full windows)", "truncate": "truncate (one row per document, padded)"}
PREPEND_BOS = {"always": "always (BOS first in every row, as SAELens and TransformerLens do)",
               "auto": "auto (as the tokenizer does)", "never": "never"}  # fmt: skip
SEPARATORS = {"bos": "BOS (as SAELens packs)", "eos": "EOS"}
# What the statistics leave out, recorded in metadata.json: position 0 of every row (BOS, or
# where there is none the attention sink, whose residual norm is 10-100x the rest's whatever
# token sits there), every BOS token (packed separators included) and padding.
STATISTICS_EXCLUDE = ("position_0", "bos", "padding")


@dataclass
class Tokens:
    ids: np.ndarray  # [num_samples, seq_len], int64
    mask: np.ndarray | None  # [num_samples, seq_len], bool; None when every position is real (packed)
    bos_token_id: int | None = None  # set when every row starts with it (position 0 is BOS)
    excluded_ids: tuple[int, ...] = ()  # tokens the statistics leave out wherever they are (the tokenizer's BOS)

    def statistics_mask(self) -> np.ndarray:
        """Positions the statistics count (STATISTICS_EXCLUDE): real tokens, but never
        position 0 (with or without a BOS there: the first position is where the attention
        sink forms, a norm of about 23,700 in SmolLM2's residual against about 174 elsewhere)
        nor a BOS anywhere."""
        keep = np.ones(self.ids.shape, dtype=bool) if self.mask is None else self.mask.copy()
        keep[:, 0] = False
        for token in self.excluded_ids:
            keep &= self.ids != token
        return keep


def bos_token(tokenizer, prepend_bos: str) -> int | None:
    """The token every row starts with, or None. `auto` does what the tokenizer itself does
    with special tokens; `always` uses BOS, else EOS (as TransformerLens does for GPT-2)."""
    if prepend_bos not in PREPEND_BOS:
        raise JobError("invalid_input", f"prepend_bos must be auto, always or never, not {prepend_bos!r}.")
    if prepend_bos == "never":
        return None
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prepend_bos == "always":
        if bos is None:
            raise JobError("invalid_input", "prepend_bos=always needs a BOS or EOS token; the tokenizer has neither.")
        return bos
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    adds = tokenizer.bos_token_id is not None and with_special[:1] == [tokenizer.bos_token_id] and without[:1] != with_special[:1]
    return tokenizer.bos_token_id if adds else None


class _Rows:
    """Rows of token ids gathered in fixed-size numpy blocks: 8 bytes a token where Python
    lists of ints take about 36, and one copy into the final array at the end (peak: the
    final array plus one block)."""

    BLOCK_ROWS = 1024

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len
        self.blocks: list[np.ndarray] = []
        self.fill = 0
        self.count = 0

    def extend(self, rows: np.ndarray) -> None:
        start = 0
        while start < len(rows):
            if not self.blocks or self.fill == self.BLOCK_ROWS:
                self.blocks.append(np.empty((self.BLOCK_ROWS, self.seq_len), dtype=np.int64))
                self.fill = 0
            take = min(self.BLOCK_ROWS - self.fill, len(rows) - start)
            self.blocks[-1][self.fill : self.fill + take] = rows[start : start + take]
            self.fill += take
            self.count += take
            start += take

    def array(self) -> np.ndarray:
        out = np.empty((self.count, self.seq_len), dtype=np.int64)
        at = 0
        while self.blocks:
            block = self.blocks.pop(0)
            n = min(self.BLOCK_ROWS, self.count - at)
            out[at : at + n] = block[:n]
            at += n
        return out


def tokenize(texts: Iterable[str], tokenizer, seq_len: int, mode: str, max_samples: int, prepend_bos: str = "never",
             separator: str = "eos") -> Tokens:  # fmt: skip
    """`packed`: documents joined, each followed by the separator (BOS, else EOS, as SAELens
    packs; or EOS), and cut into full windows (no padding, the tail that does not fill a
    window is dropped). `truncate`: one row per document, cut at seq_len, right-padded (pad
    token, else EOS, else 0: the mask marks them either way). With a BOS (see bos_token),
    every row starts with it, followed by seq_len - 1 text tokens (SAELens' convention for
    packed windows). Stops reading documents once max_samples rows exist."""
    if mode not in TOKENIZATIONS:
        raise JobError("invalid_tokenization", f"Tokenization must be packed or truncate, not {mode!r}.")
    if separator not in SEPARATORS:
        raise JobError("invalid_input", f"separator must be bos or eos, not {separator!r}.")
    bos = bos_token(tokenizer, prepend_bos)
    excluded = (tokenizer.bos_token_id,) if tokenizer.bos_token_id is not None else ()
    tokens = _tokenize(texts, tokenizer, seq_len - (bos is not None), mode, max_samples, separator)
    if bos is None:
        return Tokens(ids=tokens.ids, mask=tokens.mask, excluded_ids=excluded)
    if seq_len < 2:
        raise JobError("invalid_input", "With a BOS first, the sequence length must be at least 2.")
    ids = np.concatenate([np.full((len(tokens.ids), 1), bos, dtype=np.int64), tokens.ids], axis=1)
    mask = None if tokens.mask is None else np.concatenate([np.ones((len(ids), 1), dtype=bool), tokens.mask], axis=1)
    return Tokens(ids=ids, mask=mask, bos_token_id=bos, excluded_ids=excluded)


def separator_token(tokenizer, separator: str) -> int | None:
    """The token between packed documents: `bos` is the tokenizer's BOS, else its EOS (GPT-2
    has one token for both); `eos` its EOS."""
    if separator == "bos" and tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    return tokenizer.eos_token_id


def _tokenize(texts: Iterable[str], tokenizer, seq_len: int, mode: str, max_samples: int, separator: str) -> Tokens:
    eos = tokenizer.eos_token_id
    rows = _Rows(seq_len)
    if mode == "packed":
        joint = separator_token(tokenizer, separator)
        if joint is None:
            raise JobError("invalid_tokenization", "Packed tokenization needs a BOS or EOS token between documents; "
                                                   "the tokenizer has neither.")  # fmt: skip
        pending = np.empty(0, dtype=np.int64)  # fewer than seq_len ids carried into the next document
        for text in texts:
            document = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"] + [joint], dtype=np.int64)
            pending = np.concatenate([pending, document])
            full = min(len(pending) // seq_len, max_samples - rows.count)
            if full:
                rows.extend(pending[: full * seq_len].reshape(full, seq_len))
                pending = pending[full * seq_len :]
            if rows.count >= max_samples:
                break
        return Tokens(ids=rows.array(), mask=None)
    pad = next((t for t in (tokenizer.pad_token_id, eos) if t is not None), 0)
    lengths = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=seq_len)["input_ids"][:seq_len]
        if not ids:
            continue
        row = np.full((1, seq_len), pad, dtype=np.int64)
        row[0, : len(ids)] = ids
        rows.extend(row)
        lengths.append(len(ids))
        if rows.count >= max_samples:
            break
    mask = np.arange(seq_len)[None, :] < np.asarray(lengths, dtype=np.int64).reshape(-1, 1)
    return Tokens(ids=rows.array(), mask=mask.reshape(len(lengths), seq_len))
