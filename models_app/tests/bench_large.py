"""Issue 20, item 3 (prints a table; not a test, not in the timed suite; `scripts/bench-large`):
Llama-2-7B- and 13B-shaped FP16 models (random weights, SmolLM2's 49,152-token tokenizer so
the text tokenizes) made as Q4 on this machine's CPU, as a user would: `quantize_model --sync`
(Q4 streamed tensor by tensor from the mapped shards, reloaded, perplexity measured), then
`extract_activations --sync` of 3 layers x 3 hooks from the saved Q4; Q8 (streamed the same
way) with `quantize_model` alone, before them. Each command runs in
its own process; this one samples that process's /proc/PID/smaps_rollup every 0.1 s: peak
anonymous memory (what the process allocated; mapped file pages not counted) and peak RSS
(mapped shard pages counted). The baseline, in the same run and on the same source:
transformers' own bitsandbytes path (`from_pretrained(quantization_config=...)` +
`save_pretrained`), the way Q4 was made before. The 13B's source (26 GB) is built once,
never copied, and removed after its rows, as is every other file this writes.

    scripts/bench-large                                 # 7B then 13B, Q8 then Q4
    BENCH_SHAPES=7B BENCH_FORMATS=Q4 scripts/bench-large
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mistudio.hub import format_bytes
from models_app.ml import quantize
from models_app.tests.bench_models import report
from models_app.tests.support import ROOT, smollm2_folder, subprocess_env

LLAMA2 = {
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),  # the script's own check
}
SHARD_BYTES = int(os.environ.get("BENCH_SHARD_BYTES", 5 * 10**9))  # the Hub's usual shard size (max_shard_size="5GB")
SHAPES = os.environ.get("BENCH_SHAPES", "7B,13B").split(",")
FORMATS = os.environ.get("BENCH_FORMATS", "Q4,Q8").split(",")  # Q4: with the baseline and the extraction


class Peaks:
    """Samples a process's memory until it exits: peak anonymous and peak RSS, bytes."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid, self.interval = pid, interval
        self.anonymous = self.rss = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        path = Path(f"/proc/{self.pid}/smaps_rollup")
        while True:
            try:
                fields = dict(line.split(":", 1) for line in path.read_text().splitlines()[1:])
            except (OSError, ValueError):
                return
            self.anonymous = max(self.anonymous, int(fields["Anonymous"].split()[0]) * 1024)
            self.rss = max(self.rss, int(fields["Rss"].split()[0]) * 1024)
            time.sleep(self.interval)

    def join(self) -> Peaks:
        self._thread.join()
        return self


def measured(args: list[str], env: dict) -> tuple[float, Peaks, str]:
    """Run `python ARGS` from the repo root: (seconds, its memory peaks, its output)."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = Peaks(process.pid)
    out, _ = process.communicate()
    peaks.join()
    seconds = time.perf_counter() - started
    assert process.returncode == 0, out[-3000:]
    return seconds, peaks, out


def build_fp16_source(folder: Path, shape: str) -> int:
    """A Llama-2-shaped FP16 checkpoint in 5 GB shards, written tensor by tensor (one shard's
    tensors held at a time), random normal weights (std 0.02), norms at one. Its parameters."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = smollm2_folder()
    special = {k: v for k, v in json.loads((tokenizer / "config.json").read_text()).items() if k.endswith("token_id")}
    config = AutoConfig.for_model("llama", **LLAMA2[shape], vocab_size=49152, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                  tie_word_embeddings=False, dtype="float16", **special)  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    pending: dict[str, torch.Tensor] = {}
    written: list[tuple[Path, list[str]]] = []

    def write() -> None:
        path = folder / f"part-{len(written)}"
        save_file(pending, str(path), metadata={"format": "pt"})
        written.append((path, list(pending)))
        pending.clear()

    for name, size in shapes.items():
        tensor = torch.ones(size, dtype=torch.float16) if name.endswith("norm.weight") else torch.empty(size, dtype=torch.float16).normal_(0, 0.02, generator=generator)  # fmt: skip
        if pending and sum(t.nbytes for t in pending.values()) + tensor.nbytes > SHARD_BYTES:
            write()
        pending[name] = tensor
    write()
    quantize._name_shards(folder, written)  # transformers' shard names and index, as the app writes them
    config.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (tokenizer / name).is_file():
            shutil.copy2(tokenizer / name, folder / name)
    return sum(size.numel() for size in shapes.values())


def quantized(source, fmt: str, env: dict, row):
    """`manage.py quantize_model SOURCE --quantization FMT --sync`, measured and reported: the
    ready record and the process's peak anonymous memory."""
    from models_app.models import Model

    seconds, peaks, out = measured(["manage.py", "quantize_model", source.id, "--quantization", fmt, "--sync", "--json"], env)
    made = Model.objects.get(pk=json.loads(out.strip().splitlines()[-1])["id"])
    assert (made.status, made.quantization) == ("ready", fmt), made.error_message
    size = made.memory_measured_bytes
    row(f"quantize_model {fmt} (streamed, reloaded, perplexity on 256 tokens)",
        f"{seconds:.0f} s, peak anonymous {format_bytes(peaks.anonymous)} ({peaks.anonymous / size:.2f}x the {fmt} model's "
        f"{format_bytes(size)}), peak RSS {format_bytes(peaks.rss)}, {format_bytes(made.disk_size_bytes)} on disk, "
        f"perplexity {made.perplexity:,.0f} (random weights)")  # fmt: skip
    return made, peaks.anonymous


BASELINE = """
import sys
from pathlib import Path
from models_app.ml import quantize
src, dest = Path(sys.argv[1]), Path(sys.argv[2])
quantize.save_in_format(quantize.load_in_format(src, "Q4", "cpu"), "Q4", src, dest)
"""


@pytest.mark.timeout(4 * 3600)
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("shape", SHAPES)
def test_q4_of_a_model_larger_than_memory(shape, data_dir, tmp_path, settings):
    from activations_app import services as extraction_services
    from activations_app.models import Extraction
    from conftest import ready_model_record
    from models_app.ml.loading import folder_size

    env = {**subprocess_env(), "MISTUDIO_TEST_ZYGOTE": "0", "MISTUDIO_PERPLEXITY_TOKENS": "256"}
    source = tmp_path / f"llama2-{shape.lower()}-fp16"
    free = shutil.disk_usage(tmp_path).free
    rows: list[tuple[str, str]] = []

    def row(label: str, value: str) -> None:
        rows.append((label, value))
        print(f"  [{shape}] {label}: {value}", flush=True)

    try:
        started = time.perf_counter()
        params = build_fp16_source(source, shape)
        source_bytes = folder_size(source)
        row("source", f"{params / 1e9:.2f} B params, {format_bytes(source_bytes)} FP16 in "
                               f"{len(list(source.glob('*.safetensors')))} shards, built in {time.perf_counter() - started:.0f} s "
                               f"(disk free before: {format_bytes(free)})")  # fmt: skip
        fp16 = ready_model_record(source, f"Llama-2-{shape}-shaped")

        if "Q8" in FORMATS:  # streamed the same way; LLM.int8's reload and forward pass are its own
            q8, peak = quantized(fp16, "Q8", env, row)
            shutil.rmtree(q8.quantized_path)
            if shape != "tiny":
                assert peak <= 1.5 * q8.memory_measured_bytes
        if "Q4" not in FORMATS:
            return

        if shape != "tiny":  # the baseline: transformers loads and quantizes in one call, then saves
            seconds, peaks, _ = measured(["-c", BASELINE, str(source), str(tmp_path / "baseline-q4")], env)
            q4_disk = folder_size(tmp_path / "baseline-q4")
            shutil.rmtree(tmp_path / "baseline-q4")
            row("baseline: transformers' Q4", f"{seconds:.0f} s, peak anonymous {format_bytes(peaks.anonymous)}, "
                                                       f"peak RSS {format_bytes(peaks.rss)}, {format_bytes(q4_disk)} on disk")  # fmt: skip

        made, quantize_peak = quantized(fp16, "Q4", env, row)
        q4 = made.memory_measured_bytes

        text = (Path(ROOT) / "models_app" / "ml" / "data" / "perplexity_text.txt").read_text()
        (data_dir / "imports" / "prose.txt").write_text(text)
        dataset = extraction_services.import_dataset(path=str(data_dir / "imports" / "prose.txt"))
        layers = LLAMA2[shape]["num_hidden_layers"]
        chosen = f"0,{layers // 2},{layers - 1}"
        seconds, peaks, out = measured(["manage.py", "extract_activations", made.id, "--dataset", dataset.id, "--layers", chosen,
                                        "--hooks", "residual,mlp,attention", "--max-samples", "8", "--seq-len", "64",
                                        "--batch-size", "4", "--sync"], env)  # fmt: skip
        extraction = Extraction.objects.get(model_id=made.id)
        assert extraction.status == "completed", extraction.error_message
        import numpy as np

        files = sorted(extraction.final_dir.glob("layer_*_*.npy"))
        files = [f for f in files if not f.name.endswith(".norms.npy")]
        shapes = {np.load(f, mmap_mode="r").shape for f in files}
        assert len(files) == 9 and shapes == {(8, 64, LLAMA2[shape]["hidden_size"])}, (files, shapes)
        row(f"extract_activations layers {chosen} x residual,mlp,attention (8 x 64 tokens)",
                     f"{seconds:.0f} s, peak anonymous {format_bytes(peaks.anonymous)} ({peaks.anonymous / q4:.2f}x), "
                     f"peak RSS {format_bytes(peaks.rss)}; 9 files of {shapes.pop()}")  # fmt: skip
        report(f"Q4 of a Llama-2-{shape}-shaped FP16 model on {os.cpu_count()} CPU cores, "
               f"{format_bytes(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))} memory", rows)
        if shape != "tiny":  # a tiny model is all interpreter: torch and transformers alone take ~0.6 GB
            assert quantize_peak <= 1.5 * q4 and peaks.anonymous <= 1.5 * q4
    finally:
        shutil.rmtree(source, ignore_errors=True)
        shutil.rmtree(settings.DATA_DIR / "models", ignore_errors=True)
