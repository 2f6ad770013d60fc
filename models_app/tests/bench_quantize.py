"""Quantization benchmark (prints a table; not a test): SmolLM2-135M on this machine's
device, one row per format in one run — time to quantize, size on disk, estimated and
measured memory, perplexity on the shipped text and greedy "The capital of France is"."""

import time

import torch

from mistudio.hub import format_bytes
from models_app.ml import quality, quantize
from models_app.ml.loading import folder_size, read_config


def test_quantization_table(smollm2_folder, tmp_path):
    from transformers import AutoTokenizer

    config = read_config(smollm2_folder)
    device = quantize.compute_device()
    estimates = quantize.memory_estimate(config, device)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    ids = tokenizer("The capital of France is", return_tensors="pt").to(device)
    rows = []
    baseline = None
    for fmt in quantize.FORMATS_SMALLEST_LAST:
        started = time.perf_counter()
        model, result = quantize.quantize_snapshot(smollm2_folder, fmt, lambda f: tmp_path / f, estimates, None, device)
        seconds = time.perf_counter() - started
        disk = folder_size(tmp_path / result.produced)
        ppl = quality.perplexity(model, tokenizer)
        baseline = baseline or ppl
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=4, do_sample=False)
        text = tokenizer.decode(out[0][ids["input_ids"].shape[1] :]).replace("\n", " ").strip()
        rows.append(
            (
                result.produced,
                f"{seconds:6.1f} s",
                format_bytes(disk),
                format_bytes(estimates[result.produced] / 1.2),
                format_bytes(result.footprint_bytes),
                f"{ppl:8.2f} ({100 * (ppl - baseline) / baseline:+.1f} %)",
                repr(text[:24]),
            )
        )
        del model
        quantize.free_accelerator_memory()
    header = ("format", "quantize", "disk", "est. weights", "measured", "perplexity (vs FP32)", "greedy continuation")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print(f"\n== Quantization of SmolLM2-135M on {device.upper()} ({torch.__version__}); quantize = load + quantize + save")
    for row in [header] + rows:
        print("  " + "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
