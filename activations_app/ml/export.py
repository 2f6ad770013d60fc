"""Exports of a finished extraction for the trainers that read activations directly.

SAELens: one Hugging Face `datasets` dataset per layer/hook, in the layout SAELens'
ActivationsStore loads with `cached_activations_path`: a column named by the
TransformerLens hook (`blocks.{i}.hook_resid_post`, `blocks.{i}.hook_mlp_out`,
`blocks.{i}.hook_attn_out`) of `Array2D(seq_len, d)` and `token_ids`. Written with the
`datasets` library itself, streamed row block by row block from the memory-mapped .npy
files (never a whole file in memory), into a staged folder moved into place when whole."""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mistudio.errors import InvalidInput, JobError

TRANSFORMERLENS_HOOKS = {"residual": "hook_resid_post", "mlp": "hook_mlp_out", "attention": "hook_attn_out"}
FORMATS = ("saelens",)
# Hook names in the export: "hf", the Hugging Face module paths (model.layers.15, …), which
# SAELens' AutoModelForCausalLM loading path hooks and which every model here has; "tl", the
# TransformerLens names (blocks.15.hook_resid_post), for models TransformerLens itself loads.
NAMINGS = ("hf", "tl")
DEFAULT_NAMING = "hf"
NAMING_REASON = ("hf: the model's own module paths, which SAELens hooks when it loads a model through "
                 "AutoModelForCausalLM (any Hugging Face model); --naming tl gives TransformerLens names, for a "
                 "model TransformerLens itself supports")
# The repos TransformerLens loads by name (its OFFICIAL_MODEL_NAMES, by family): SAELens' default
# path (HookedTransformer) loads only these, and hooks them by TransformerLens names. Another
# model of the same architecture (SmolLM2 is a Llama) is not loaded by TransformerLens at all.
TRANSFORMERLENS_REPOS = re.compile(
    r"(gpt2|gpt2-medium|gpt2-large|gpt2-xl|distilgpt2|openai-community/gpt2(-medium|-large|-xl)?|"
    r"EleutherAI/(pythia-[\w.-]+|gpt-neo-[\w.]+|gpt-j-6B|gpt-neox-20b)|facebook/opt-[\w.]+|"
    r"roneneldan/TinyStories-[\w-]+|NeelNanda/[\w-]+|stanford-crfm/[\w-]+|bigscience/bloom-[\w.]+|"
    r"google/gemma-[\w.-]+|meta-llama/(Llama-2|Meta-Llama-3|Llama-3\.[12])-[\w.-]+|mistralai/Mistral-7B-[\w.-]+|"
    r"mistralai/Mixtral-8x7B-[\w.-]+|Qwen/Qwen(1\.5|2|2\.5)?-[\w.-]+|microsoft/phi-[\w.-]+|microsoft/Phi-3-[\w.-]+|"
    r"stabilityai/stablelm-[\w.-]+|bigcode/santacoder|ai-forever/mGPT)"
)


def default_naming(repo_id: str | None) -> tuple[str, str]:
    """The naming that works for the model's SAELens loading path, and why (the command says
    both): `tl` for a model TransformerLens loads by name, `hf` for every other."""
    if repo_id and TRANSFORMERLENS_REPOS.fullmatch(repo_id):
        return "tl", (f"tl: {repo_id} is a model TransformerLens loads by name, so SAELens' default "
                      "model_class_name='HookedTransformer' hooks it by these names; --naming hf gives its module paths")  # fmt: skip
    return "hf", NAMING_REASON
ROWS_PER_BLOCK = 64


def hook_name(layer: int, hook: str) -> str:
    return f"blocks.{layer}.{TRANSFORMERLENS_HOOKS[hook]}"


def default_out_dir(extraction_dir: Path, fmt: str) -> Path:
    """Where an export goes when no folder is named: the extraction's own `{format}/`."""
    return extraction_dir / fmt


def check_out_dir(extraction_dir: Path, out_dir: Path, fmt: str) -> Path:
    """The folder an export may be written to, resolved; refuses anything else before a byte
    is written. A folder the user names must be new or empty and lie outside the
    extraction's folder: an export never replaces, and so never deletes, what it did not
    make. Only the default folder (the app's own, inside the extraction) is replaced by a
    newer export."""
    extraction_dir, out_dir = Path(extraction_dir).resolve(), Path(out_dir).resolve()
    if out_dir == default_out_dir(extraction_dir, fmt):
        return out_dir
    if out_dir == extraction_dir or extraction_dir in out_dir.parents:
        raise InvalidInput("out", "The export folder must lie outside the extraction's own folder; leave --out out to "
                                  f"write into its {fmt}/ folder.", code="invalid_out_dir")  # fmt: skip
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise InvalidInput("out", f"{out_dir.name} exists and is not a folder; name a new or empty folder.", code="invalid_out_dir")
        try:
            empty = next(out_dir.iterdir(), None) is None
        except OSError:
            raise InvalidInput("out", f"{out_dir.name} cannot be read; name a new or empty folder.", code="invalid_out_dir") from None
        if not empty:
            raise InvalidInput("out", f"{out_dir.name} is not empty; an export is written only into a new or empty folder, "
                                      "so nothing already there is replaced.", code="out_dir_not_empty")  # fmt: skip
    return out_dir


def _new_staging_dir(out_dir: Path, staging: Path | None = None) -> Path:
    """A sibling folder that this run creates and so alone may remove: two exports at once
    never share (or delete) each other's staging. `staging` names it after the export's own
    record (`.{out}.partial-{export id}`), so that what a killed run left is found and removed
    by that record's clean-up (a retry, a dead worker) and by nothing else."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging or out_dir.with_name(f".{out_dir.name}.partial-{uuid.uuid4().hex[:12]}")
    if staging is not None and staging.is_dir():
        shutil.rmtree(staging)  # this export's own, left by a run of it that was killed
    tmp.mkdir()
    return tmp


def _move_into_place(tmp: Path, out_dir: Path, replaceable: bool) -> None:
    """rename(2) puts the finished folder in place and replaces at most an *empty* folder
    (a non-empty one fails the call, whatever appeared there meanwhile). The default folder
    holds an older export of ours: it is set aside by rename first and removed once the new
    one is in place."""
    old = None
    if replaceable and out_dir.is_dir() and next(out_dir.iterdir(), None) is not None:
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:12]}")
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if old is not None:
            os.rename(old, out_dir)
        raise JobError("out_dir_not_empty", f"{out_dir.name} is no longer empty; the export was not moved into it and "
                                            "nothing there was touched.") from None  # fmt: skip
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_bytes(extraction_dir: Path) -> int:
    """About what an export of the extraction writes: its activation files' size (the
    datasets hold the same values, and the token ids once per hook)."""
    folder = Path(extraction_dir)
    tokens = (folder / "tokens.npy").stat().st_size if (folder / "tokens.npy").is_file() else 0
    files = [p for p in folder.glob("layer_*.npy") if not p.name.endswith(".norms.npy")]
    return sum(p.stat().st_size for p in files) + tokens * len(files)


def check_free_space(out_dir: Path, needed_bytes: int, reserve_bytes: int) -> None:
    """Refuse before a byte is written when the filesystem the export goes to (its nearest
    existing folder: nothing is created to ask) has less free space than it needs."""
    probe = Path(out_dir)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed_bytes + reserve_bytes > free:
        raise JobError("insufficient_disk_space", f"The export needs about {needed_bytes / 1e9:.2f} GB (plus "
                                                  f"{reserve_bytes / 1e9:.2f} GB kept free) but only {free / 1e9:.2f} GB "
                                                  f"is free where it goes.")  # fmt: skip


MAX_SEED = 2**32 - 1
ROW_ORDER = "row_order.npy"


def row_order(n: int, seed: int | None) -> np.ndarray | None:
    """The export's rows as rows of the extraction: None keeps their order (text order), a
    seed gives numpy's permutation of them (`numpy.random.default_rng(seed).permutation(n)`),
    the same for every hook and the tokens dataset, so their rows still line up."""
    return None if seed is None else np.random.default_rng(seed).permutation(n)


def _blocks(n: int, order: np.ndarray | None):
    """(positions of the export's rows, the extraction rows to read for them in that order),
    a block at a time. A shuffled block is read from the memory map in ascending row order
    (one pass forward over the file, each row a contiguous read) and put in the permuted
    order in memory: one block in memory, never a second copy of the data."""
    for start in range(0, n, ROWS_PER_BLOCK):
        if order is None:
            yield slice(start, min(n, start + ROWS_PER_BLOCK)), None
        else:
            wanted = order[start : start + ROWS_PER_BLOCK]
            ascending = np.sort(wanted)
            yield ascending, np.searchsorted(ascending, wanted)


def _read(array, rows, reorder) -> np.ndarray:
    block = np.asarray(array[rows])
    return block if reorder is None else block[reorder]


def export_saelens(extraction_dir: Path, out_dir: Path, on_progress: Callable[[int, int], None] | None = None,
                   staging: Path | None = None, naming: str = DEFAULT_NAMING, shuffle: int | None = None) -> list[Path]:  # fmt: skip
    """One dataset per layer/hook under `out_dir/{hook name}/`, named the `naming` way
    (NAMINGS), its rows in text order or (`shuffle`, a seed) permuted across the whole
    export; the folders' paths."""
    import datasets

    metadata = _metadata(extraction_dir)
    out_dir = check_out_dir(extraction_dir, out_dir, "saelens")
    replaceable = out_dir == default_out_dir(Path(extraction_dir).resolve(), "saelens")
    layers, hooks = metadata["config"]["layers"], metadata["config"]["hook_types"]
    tokens = np.load(extraction_dir / "tokens.npy", mmap_mode="r")
    rows_in, seq_len = tokens.shape
    order = row_order(rows_in, shuffle)
    kept = rows_without_outliers(extraction_dir, metadata, layers, hooks)
    if kept is not None:  # the extraction left its outliers out: so do its rows here, in every hook alike
        order = kept if order is None else order[np.isin(order, kept)]
    n = rows_in if order is None else len(order)
    total, done = n * len(layers) * len(hooks), 0
    tmp = _new_staging_dir(out_dir, staging)
    written = []
    try:
        if order is not None:
            np.save(tmp / ROW_ORDER, order)  # export row i is extraction row order[i]
        for layer in layers:
            for hook in hooks:
                values = np.load(extraction_dir / f"layer_{layer}_{hook}.npy", mmap_mode="r")
                name = export_name(metadata, layer, hook, naming)
                d_in = int(values.shape[2])
                features = datasets.Features({
                    name: datasets.Array2D(shape=(seq_len, values.shape[2]), dtype=str(values.dtype)),
                    "token_ids": datasets.Sequence(datasets.Value("int32"), length=seq_len),
                })  # fmt: skip

                def rows(values=values, name=name):
                    nonlocal done
                    for positions, reorder in _blocks(n, order):
                        block = _read(values, positions, reorder)  # one block in memory
                        ids = _read(tokens, positions, reorder).astype(np.int32)
                        for row, row_ids in zip(block, ids, strict=True):
                            yield {name: row, "token_ids": row_ids}
                        done += len(block)
                        if on_progress:
                            on_progress(done, total)

                cache = tmp / ".cache"
                # An explicit fingerprint: else `datasets` hashes the generator's closure, which
                # pickles the whole memory-mapped array.
                dataset = datasets.Dataset.from_generator(rows, features=features, cache_dir=str(cache),
                                                          writer_batch_size=ROWS_PER_BLOCK, fingerprint=uuid.uuid4().hex)  # fmt: skip
                dataset.save_to_disk(str(tmp / name))
                del dataset
                shutil.rmtree(cache, ignore_errors=True)
                written.append(out_dir / name)
        # The exact token windows as their own dataset (a `tokens` column): SAELens asks for a
        # dataset even when it reads cached activations, and this is the one they came from. It
        # opens `dataset_path` with datasets.load_dataset(path, split="train"), which reads a
        # folder of parquet files (not a save_to_disk folder): so parquet, one train split.
        features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("int32"), length=seq_len)})

        def token_rows():
            for positions, reorder in _blocks(n, order):
                for row_ids in _read(tokens, positions, reorder).astype(np.int32):
                    yield {"tokens": row_ids}

        cache = tmp / ".cache"
        (tmp / TOKENS_DATASET).mkdir()
        datasets.Dataset.from_generator(token_rows, features=features, cache_dir=str(cache), writer_batch_size=ROWS_PER_BLOCK,
                                        fingerprint=uuid.uuid4().hex).to_parquet(str(tmp / TOKENS_DATASET / TOKENS_FILE))  # fmt: skip
        shutil.rmtree(cache, ignore_errors=True)
        record = export_record(metadata, out_dir, layers, hooks, seq_len, d_in, naming, shuffle,
                               left_out=None if kept is None else rows_in - len(kept))  # fmt: skip
        (tmp / "export.json").write_text(json.dumps(record, indent=2))
        _move_into_place(tmp, out_dir, replaceable)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written


TOKENS_DATASET = "tokens"
TOKENS_FILE = "train.parquet"
SAELENS_VERSION = "6.54.12"  # the release whose config fields `runner` and `sae` below are checked against


def export_name(metadata: dict, layer: int, hook: str, naming: str) -> str:
    """A layer/hook's column and folder name: its module path (hf), or its TransformerLens
    name (tl; also for an extraction too old to have recorded its module paths)."""
    if naming == "hf":
        path = metadata.get("hook_modules", {}).get(f"layer_{layer}_{hook}")
        if path:
            return path
    return hook_name(layer, hook)


def rows_without_outliers(extraction_dir: Path, metadata: dict, layers: list[int], hooks: list[str]) -> np.ndarray | None:
    """The extraction's rows that hold no outlier token in any exported hook, ascending, when
    it was made with the `exclude` rule (None: every row is exported). One set of rows for
    every hook, so the hooks and the tokens dataset still line up row by row."""
    from .outliers import outlier_mask

    rule = metadata.get("outliers") or {}
    if rule.get("rule") != "exclude":
        return None
    bad = None
    for layer in layers:
        for hook in hooks:
            above, _ = outlier_mask(np.load(Path(extraction_dir) / f"layer_{layer}_{hook}.norms.npy", mmap_mode="r"),
                                    rule["factor"])  # fmt: skip
            bad = above.any(axis=1) if bad is None else bad | above.any(axis=1)
    return np.flatnonzero(~bad)


def export_record(metadata: dict, out_dir: Path, layers: list[int], hooks: list[str], seq_len: int, d_in: int,
                  naming: str = DEFAULT_NAMING, shuffle: int | None = None, left_out: int | None = None) -> dict:  # fmt: skip
    """`export.json`: what the activations are (model, dataset, tokenization, BOS, dtype,
    width), how they were summarized (the norm scaling factor per hook and what it leaves
    out) and, per hook, the SAELens settings that load them with no glue code. SAELens'
    `cached_activations_path` is the hook's own folder, not the export's root."""
    config = metadata.get("config", {})
    statistics = metadata.get("statistics", {})
    bos = metadata.get("bos_token_id")
    model = metadata.get("model") or {}
    packed = config.get("tokenization") == "packed"
    separator = (metadata.get("separator") or "eos") if packed else None
    excluded = metadata.get("excluded_token_ids", [])
    per_hook, transformerlens_names = {}, {}
    for layer in layers:
        for hook in hooks:
            name = export_name(metadata, layer, hook, naming)
            transformerlens_names[name] = hook_name(layer, hook)
            figures = statistics.get(f"layer_{layer}_{hook}", {})
            # LanguageModelSAERunnerConfig(sae=StandardTrainingSAEConfig(**sae, d_sae=…), **runner, …)
            # with SAELens SAELENS_VERSION: every key is one of its fields.
            runner = {
                "model_name": model.get("repo_id") or "",
                "model_class_name": "HookedTransformer" if naming == "tl" else "AutoModelForCausalLM",
                "hook_name": name,
                # Relative: SAELens 6.54.12 checks a tokenized dataset_path's tokenizer with
                # hf_hub_download(dataset_path), which refuses an absolute path (HFValidationError)
                # before load_dataset would have read it. "tokens" is a local folder to
                # load_dataset and a repo id to that check: train from the export's folder.
                "dataset_path": TOKENS_DATASET,
                "is_dataset_tokenized": True,
                "streaming": False,
                "context_size": seq_len,
                "prepend_bos": bos is not None,
                "use_cached_activations": True,
                "cached_activations_path": str(out_dir / name),
                # BOS (first, and between packed documents) stays out of training as it stays out of
                # the statistics; the cached reader cannot leave out position 0 by position.
                "exclude_special_tokens": list(excluded) or False,
            }
            if packed:
                runner["sequence_separator_token"] = separator
            per_hook[name] = {
                **runner,
                "hook_layer": layer,
                "d_in": d_in,
                "norm_scaling_factor": figures.get("norm_scaling_factor"),
                "runner": runner,
                "sae": {"d_in": d_in, "normalize_activations": "expected_average_only_in"},
            }
    return {
        "format": "saelens",
        "naming": naming,
        "naming_reason": _naming_reason(metadata, naming),
        "transformerlens_names": transformerlens_names,
        "extraction_id": metadata.get("extraction_id"),
        "model": metadata.get("model"),
        "dataset": metadata.get("dataset"),
        "path": str(out_dir),
        "tokens_dataset": str(out_dir / TOKENS_DATASET),
        "context_size": seq_len,
        "d_in": d_in,
        "dtype": config.get("dtype", metadata.get("dtype")),
        "tokenization": {
            "mode": config.get("tokenization"),
            # Recorded since the separator became a choice; packed runs from before joined with EOS.
            "separator": separator,
            "prepend_bos": metadata.get("prepend_bos"),
            "bos_token_id": bos,
            "excluded_token_ids": list(excluded),
            "tokenizer": metadata.get("tokenizer"),
        },
        "normalization": {
            "statistic": "norm_scaling_factor = sqrt(d_in) / mean token norm, per hook",
            "left_out": metadata.get("statistics_exclude", []),
            "advice": "train with normalize_activations='expected_average_only_in', or scale by the hook's "
                      "norm_scaling_factor below",
        },
        "row_order": (
            {"shuffled": False, "rows": "the extraction's, in text order"} if shuffle is None else
            {"shuffled": True, "seed": shuffle, "permutation": "numpy.random.default_rng(seed).permutation(rows)",
             "file": str(out_dir / ROW_ORDER), "rows": f"export row i is extraction row {ROW_ORDER}[i], in every hook "
                                                       "and in the tokens dataset"}
        ),  # fmt: skip
        "outliers": (
            {"rule": "keep", "rows_left_out": 0} if left_out is None else
            {"rule": "exclude", "factor": (metadata.get("outliers") or {}).get("factor"), "rows_left_out": left_out,
             "rows": f"rows holding a token whose norm is above factor x its file's median, in any exported hook, are "
                     f"left out of every hook and of the tokens dataset; {ROW_ORDER} names the extraction row of each "
                     "export row"}
        ),  # fmt: skip
        "hooks": list(per_hook),
        "saelens_version": SAELENS_VERSION,
        "saelens": per_hook,
    }


def _naming_reason(metadata: dict, naming: str) -> str:
    default, reason = default_naming((metadata.get("model") or {}).get("repo_id"))
    return reason if naming == default else f"{naming}: asked for (the default for this model is {reason})"


def saelens_snippet(record: dict) -> str:
    """The SAELens config for the first hook, as a user pastes it (the other hooks differ
    only in their name and folder; export.json has each one's `runner` and `sae`)."""
    first = record["saelens"][record["hooks"][0]]
    runner = [f"    {key}={value!r}," for key, value in first["runner"].items()]
    sae = ", ".join(f"{key}={value!r}" for key, value in first["sae"].items())
    return (f"# SAELens {record.get('saelens_version', SAELENS_VERSION)}, run from the export's folder ({record.get('path', '.')}):\n"
            "# dataset_path is relative, as SAELens' tokenizer check of a pre-tokenized dataset needs\n"
            "from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, StandardTrainingSAEConfig\n\n"
            f"cfg = LanguageModelSAERunnerConfig(\n    sae=StandardTrainingSAEConfig({sae}, d_sae={first['sae']['d_in'] * 8}),\n"
            + "\n".join(runner) + "\n    training_tokens=..., train_batch_size_tokens=4096,\n)\n"
            "sae = LanguageModelSAETrainingRunner(cfg).run()")  # fmt: skip


def _metadata(extraction_dir: Path) -> dict:
    try:
        return json.loads((extraction_dir / "metadata.json").read_text())
    except (OSError, ValueError):
        raise JobError("not_exportable", f"{extraction_dir.name} has no readable metadata.json; it is not a finished extraction.") from None
