"""Trains an SAE with SAELens from one hook of a miStudio export, as a researcher would: the
config is built from export.json's `runner` and `sae` for that hook and nothing else (no
renamed columns, no paths fixed up, no dataset loaded by hand). Runs in .venv-saelens (see
scripts/saelens-e2e), never in the app's own environment. Prints one JSON line.

    python saelens_train.py EXPORT_DIR HOOK_NAME STEPS
"""

import json
import math
import sys
from pathlib import Path

import datasets
import torch
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig, StandardTrainingSAEConfig


def main(export_dir: str, hook: str, steps: int) -> None:
    record = json.loads((Path(export_dir) / "export.json").read_text())
    settings = record["saelens"][hook]
    batch = 256
    cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(**settings["sae"], d_sae=4 * settings["sae"]["d_in"]),
        **settings["runner"],
        training_tokens=steps * batch,
        train_batch_size_tokens=batch,
        n_batches_in_buffer=16,  # its mixing buffer holds this many context windows: at least a batch
        store_batch_size_prompts=4,
        lr=1e-3,
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
        output_path=None,
        seed=0,
    )
    runner = LanguageModelSAETrainingRunner(cfg)
    sae = runner.run()
    cached = datasets.load_from_disk(settings["cached_activations_path"]).with_format("torch")
    # The hook is where SAELens' own model puts it: its activations at `hook_name` for the
    # export's first rows (their own token ids) against the export's stored values.
    first = cached[:4]
    with torch.no_grad():
        _, cache = runner.model.run_with_cache(first["token_ids"].long(), names_filter=[hook])
    live = cache[hook].float()
    stored = first[hook].float()
    hook_error = ((live - stored).abs().max() / stored.abs().max()).item()
    # The trained SAE (its normalisation folded back in by SAELens) on the export's own rows.
    acts = cached[:][hook].reshape(-1, settings["sae"]["d_in"]).float()
    ids = cached[:]["token_ids"].reshape(-1)
    excluded = settings["runner"]["exclude_special_tokens"] or []
    keep = ~torch.isin(ids, torch.tensor(excluded, dtype=ids.dtype)) if excluded else torch.ones_like(ids, dtype=torch.bool)
    acts = acts[keep]
    with torch.no_grad():
        recon = sae.decode(sae.encode(acts))
    mse = ((recon - acts) ** 2).sum(-1).mean().item()
    variance = ((acts - acts.mean(0)) ** 2).sum(-1).mean().item()
    finite = all(torch.isfinite(p).all().item() for p in sae.parameters())
    print(json.dumps({"hook": hook, "steps": steps, "d_in": cfg.sae.d_in, "d_sae": cfg.sae.d_sae, "finite": finite,
                      "explained_variance": 1 - mse / variance if variance else math.nan,
                      "model_class_name": cfg.model_class_name, "tokens": int(keep.sum()),
                      "hook_relative_error": hook_error}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
