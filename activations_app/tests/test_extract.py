"""Extraction is exact: what lands in the .npy files is what the model computed at the
hooked modules, captured independently, down to float32 precision (float16 rounding)."""

import errno
import json
import os

import numpy as np
import pytest
import torch

from activations_app.ml import extract, writer
from activations_app.ml.extract import ExtractionSpec, run_extraction
from activations_app.ml.tokens import Tokens, tokenize
from activations_app.ml.hooks import HOOK_TYPES
from mistudio.errors import JobError

# Written out by hand, independently of the discovery the product uses (models_app.ml.decoder).
PARTS = {"llama": ("model.layers", "self_attn", "mlp"), "gpt2": ("transformer.h", "attn", "mlp")}

TINY = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=300, max_position_embeddings=128),
    "gpt2": dict(n_embd=64, n_layer=4, n_head=4, vocab_size=300, n_positions=128),
}  # fmt: skip


def tiny_model(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **TINY[model_type]))
    return model.eval()


def blocks_of(model, model_type):
    blocks = model
    for part in PARTS[model_type][0].split("."):
        blocks = getattr(blocks, part)
    return blocks


def reference(model, model_type, ids, mask=None):
    """hidden_states, plus every block / attention / MLP output from our own hooks."""
    _, attention, mlp = PARTS[model_type]
    captured, handles = {}, []
    for i, block in enumerate(blocks_of(model, model_type)):
        for hook, module in (("residual", block), ("attention", getattr(block, attention)), ("mlp", getattr(block, mlp))):
            handles.append(module.register_forward_hook(
                lambda _m, _i, out, key=(i, hook): captured.__setitem__(key, (out[0] if isinstance(out, tuple) else out).detach().clone())))  # fmt: skip
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=None if mask is None else torch.from_numpy(mask),
                    output_hidden_states=True, use_cache=False)  # fmt: skip
    for handle in handles:
        handle.remove()
    return out.hidden_states, captured


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_every_hook_matches_the_model_to_float32_precision(model_type, tmp_path):
    model = tiny_model(model_type)
    ids = np.random.default_rng(0).integers(0, 300, size=(6, 16)).astype(np.int64)
    spec = ExtractionSpec(layers=[0, 1, 2, 3], hook_types=list(HOOK_TYPES), seq_len=16, batch_size=6, dtype="float32")
    result = run_extraction(model, model_type, Tokens(ids, None), spec, tmp_path / "activations" / "extraction_1", {"model": "tiny"})
    hidden_states, captured = reference(model, model_type, ids)
    for layer in range(4):
        residual = np.load(result.output_dir / f"layer_{layer}_residual.npy")
        assert residual.shape == (6, 16, 64) and residual.dtype == np.float32
        if layer < 3:  # transformers applies the final norm to the last hidden state
            np.testing.assert_allclose(residual, hidden_states[layer + 1].numpy(), atol=1e-6, rtol=0)
        np.testing.assert_allclose(residual, captured[(layer, "residual")].numpy(), atol=1e-6, rtol=0)
        for hook in ("attention", "mlp"):
            stored = np.load(result.output_dir / f"layer_{layer}_{hook}.npy")
            np.testing.assert_allclose(stored, captured[(layer, hook)].numpy(), atol=1e-6, rtol=0)
    assert np.array_equal(np.load(result.output_dir / "tokens.npy"), ids)


def test_float16_storage_is_the_float32_values_rounded(tmp_path):
    model = tiny_model("llama")
    ids = np.random.default_rng(1).integers(0, 300, size=(4, 16)).astype(np.int64)
    spec = ExtractionSpec(layers=[1, 2], hook_types=["residual", "mlp"], seq_len=16, batch_size=4, dtype="float16")
    result = run_extraction(model, "llama", Tokens(ids, None), spec, tmp_path / "activations" / "extraction_1", {})
    _, captured = reference(model, "llama", ids)
    for layer in (1, 2):
        stored = np.load(result.output_dir / f"layer_{layer}_mlp.npy", mmap_mode="r")
        assert stored.dtype == np.float16
        np.testing.assert_allclose(stored.astype(np.float32), captured[(layer, "mlp")].numpy(), rtol=2**-10, atol=2**-14)


def test_the_forward_pass_stops_after_the_deepest_requested_layer(tmp_path):
    model = tiny_model("llama")
    ran = []
    for i, block in enumerate(model.model.layers):
        block.register_forward_hook(lambda *_a, i=i: ran.append(i))
    model.lm_head.register_forward_hook(lambda *_a: ran.append("lm_head"))
    ids = np.zeros((2, 8), dtype=np.int64)
    spec = ExtractionSpec(layers=[0, 1], hook_types=["residual"], seq_len=8, batch_size=2)
    run_extraction(model, "llama", Tokens(ids, None), spec, tmp_path / "activations" / "extraction_1", {})
    # The layout probe (2 rows) and the one batch: blocks 2 and 3, the final norm and the LM head never ran.
    assert ran == [0, 1, 0, 1]


def test_packed_tokens_are_the_tokenizers_ids_joined_with_eos(smollm2_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    texts = ["The river runs through the city.", "Bread is baked before sunrise every day.", "Short."]
    tokens = tokenize(texts, tokenizer, seq_len=8, mode="packed", max_samples=100)
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    full = len(stream) // 8
    assert tokens.mask is None and tokens.ids.shape == (full, 8)
    assert tokens.ids.reshape(-1).tolist() == stream[: full * 8]


def test_truncate_mode_pads_masks_and_keeps_padding_out_of_the_statistics(smollm2_folder, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    model = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    texts = ["The capital of France is Paris, a city on the Seine.", "Hello there."]
    tokens = tokenize(texts, tokenizer, seq_len=12, mode="truncate", max_samples=10)
    lengths = [min(12, len(tokenizer(t, add_special_tokens=False)["input_ids"])) for t in texts]
    assert tokens.mask.sum(axis=1).tolist() == lengths
    spec = ExtractionSpec(layers=[0, 29], hook_types=list(HOOK_TYPES), seq_len=12, batch_size=2, dtype="float16")
    result = run_extraction(model, "llama", tokens, spec, tmp_path / "activations" / "extraction_1", {"model": "SmolLM2-135M"})
    out = result.output_dir
    assert np.array_equal(np.load(out / "attention_mask.npy"), tokens.mask)
    assert np.array_equal(np.load(out / "tokens.npy"), tokens.ids)
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["shapes"]["layer_29_mlp"] == [2, 12, 576] and metadata["model"] == "SmolLM2-135M"
    on_disk = sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".npy")
    assert on_disk == extract.storage_bytes(2, 12, 576, "float16", files=6, with_mask=True)  # the estimate is exact
    for stem, figures in result.statistics.items():
        # Real tokens only, and never position 0 (the attention sink, BOS or not).
        values = np.load(out / f"{stem}.npy").astype(np.float64)[tokens.mask & (np.arange(12) > 0)]
        assert figures == metadata["statistics"][stem]
        assert figures["mean_magnitude"] == pytest.approx(np.abs(values).mean(), rel=1e-9)
        assert figures["mean_l2_norm"] == pytest.approx(np.linalg.norm(values, axis=1).mean(), rel=1e-9)
        assert figures["max_magnitude"] == pytest.approx(np.abs(values).max(), rel=1e-12)
        assert (figures["min"], figures["max"]) == (pytest.approx(values.min()), pytest.approx(values.max()))
        assert figures["std"] == pytest.approx(values.std(), rel=1e-6)
        assert figures["sparsity_percent"] == pytest.approx(100 * (np.abs(values) < 0.01).mean(), rel=1e-9)
        assert (figures["nan_count"], figures["inf_count"]) == (0, 0)


def test_smollm2_residuals_match_its_hidden_states(smollm2_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    ids = np.random.default_rng(2).integers(0, 49152, size=(2, 24)).astype(np.int64)
    spec = ExtractionSpec(layers=[0, 14, 28], hook_types=list(HOOK_TYPES), seq_len=24, batch_size=2, dtype="float32")
    result = run_extraction(model, "llama", Tokens(ids, None), spec, tmp_path / "activations" / "extraction_1", {})
    hidden_states, captured = reference(model, "llama", ids)
    for layer in (0, 14, 28):
        np.testing.assert_allclose(np.load(result.output_dir / f"layer_{layer}_residual.npy"),
                                   hidden_states[layer + 1].numpy(), atol=1e-5, rtol=1e-6)  # fmt: skip
        for hook in ("attention", "mlp"):
            np.testing.assert_allclose(np.load(result.output_dir / f"layer_{layer}_{hook}.npy"),
                                       captured[(layer, hook)].numpy(), atol=1e-5, rtol=1e-6)  # fmt: skip


def _residual_run_with_pwrite(tmp_path, monkeypatch, rows: int, pwrite):
    """Layer 1's residual over `rows` rows of 16 tokens, batches of 2, with `pwrite(real,
    fd, data, offset)` in place of os.pwrite; the file must hold the model's values."""
    real = writer.os.pwrite
    monkeypatch.setattr(writer.os, "pwrite", lambda fd, data, offset: pwrite(real, fd, data, offset))
    model = tiny_model("llama")
    ids = np.random.default_rng(2).integers(0, 300, size=(rows, 16)).astype(np.int64)
    spec = ExtractionSpec(layers=[1], hook_types=["residual"], seq_len=16, batch_size=2, dtype="float16")
    result = run_extraction(model, "llama", Tokens(ids, None), spec, tmp_path / "activations" / "extraction_1", {})
    hidden_states, _ = reference(model, "llama", ids)
    np.testing.assert_array_equal(np.load(result.output_dir / "layer_1_residual.npy"), hidden_states[2].numpy().astype(np.float16))
    np.testing.assert_array_equal(np.load(result.output_dir / "tokens.npy"), ids)
    return result


def _is_direct(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def test_whole_block_batches_are_written_directly_and_a_ragged_tail_through_the_page_cache(tmp_path, monkeypatch):
    """Direct I/O takes a write only when its file offset, length and memory are 4 KiB
    aligned: the .npy data starts at 4,096 (a padded header numpy reads as usual), a batch of
    2 rows x 16 tokens x 64 float16 values is exactly 4,096 bytes, the last batch of 1 row
    is not. Either way the file holds the model's values, and numpy loads it."""
    writes = []

    def pwrite(real, fd, data, offset):
        writes.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), offset, len(data), _is_direct(fd)))
        return real(fd, data, offset)

    result = _residual_run_with_pwrite(tmp_path, monkeypatch, 5, pwrite)
    assert [w for w in writes if w[0] == "layer_1_residual.npy"] == [
        ("layer_1_residual.npy", 4096, 4096, True), ("layer_1_residual.npy", 8192, 4096, True),
        ("layer_1_residual.npy", 12288, 2048, False)]  # fmt: skip
    assert [w[3] for w in writes if w[0] == "tokens.npy"] == [False]  # 5 x 16 int64: not whole blocks
    assert np.load(result.output_dir / "layer_1_residual.npy", mmap_mode="r").offset == 4096


def test_a_filesystem_that_opens_for_direct_io_but_refuses_the_writes_gets_page_cache_writes(tmp_path, monkeypatch):
    """Some filesystems (FUSE, older tmpfs) take O_DIRECT at open and answer the write with
    EINVAL; none here does, so that answer is simulated. The run goes on, correctly."""
    refused = []

    def pwrite(real, fd, data, offset):
        if _is_direct(fd):
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    _residual_run_with_pwrite(tmp_path, monkeypatch, 4, pwrite)
    assert len(refused) == 1  # asked once; that file's writes went through the page cache from then on


def test_a_slow_disk_delays_the_next_batch_instead_of_losing_its_rows(tmp_path, monkeypatch):
    """One set of capture buffers serves every batch: while batch k is written, batch k+1's
    forward pass must not copy into a file's buffer before that file's write is done. With
    writes far slower than this tiny model's forward pass, a capture that did not wait would
    put batch k+1's values into batch k's rows."""
    import time

    def slow(real, fd, data, offset):
        time.sleep(0.2)
        return real(fd, data, offset)

    _residual_run_with_pwrite(tmp_path, monkeypatch, 5, slow)


def test_statistics_between_batches_and_overlapped_on_the_background_thread_are_the_same(tmp_path):
    """The CPU runs them between batches on every core, a GPU run overlaps them with the next
    batch on the background thread: the same figures and files, byte for byte."""
    model = tiny_model("llama")
    ids = np.random.default_rng(6).integers(0, 300, size=(7, 16)).astype(np.int64)
    spec = ExtractionSpec(layers=[0, 2], hook_types=list(HOOK_TYPES), seq_len=16, batch_size=3, dtype="float16")
    runs = [run_extraction(model, "llama", Tokens(ids, None), spec, tmp_path / name / "extraction_1", {}, overlap_statistics=overlap)
            for name, overlap in (("between", False), ("overlapped", True))]  # fmt: skip
    assert runs[0].statistics == runs[1].statistics and runs[0].statistics["layer_2_mlp"]["tokens"] == 7 * 15  # position 0 out
    files = [{p.name: p.read_bytes() for p in run.output_dir.iterdir() if p.suffix in (".npy", ".npz")} for run in runs]
    assert files[0] == files[1] and len(files[0]) == 6 * 3 + 1  # .npy, .stats.npz and .norms.npy each, and the tokens


def test_a_full_disk_fails_before_the_first_batch_and_leaves_no_files(tmp_path, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer.os, "posix_fallocate", no_space)
    model = tiny_model("llama")
    spec = ExtractionSpec(layers=[0], hook_types=["residual"], seq_len=8, batch_size=2)
    with pytest.raises(JobError) as caught:
        run_extraction(model, "llama", Tokens(np.zeros((2, 8), dtype=np.int64), None), spec, tmp_path / "activations" / "extraction_1", {})
    assert caught.value.code == "disk_full"
    assert list((tmp_path / "activations").iterdir()) == []


def test_a_cuda_out_of_memory_halves_the_batch_and_retries_the_same_rows(tmp_path, monkeypatch):
    model = tiny_model("llama")
    real_forward = model.forward
    seen = []

    def forward(*args, **kwargs):
        rows = kwargs["input_ids"].shape[0]
        seen.append(rows)
        if rows > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")  # no GPU here: simulated
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    ids = np.random.default_rng(3).integers(0, 300, size=(6, 8)).astype(np.int64)
    spec = ExtractionSpec(layers=[1], hook_types=["residual"], seq_len=8, batch_size=6, dtype="float32")
    result = run_extraction(model, "llama", Tokens(ids, None), spec, tmp_path / "activations" / "extraction_1", {})
    assert seen[:4] == [2, 6, 3, 3] and result.batch_sizes == [3, 3]  # the layout probe's 2 rows first
    monkeypatch.undo()
    hidden_states, _ = reference(model, "llama", ids)
    np.testing.assert_allclose(np.load(result.output_dir / "layer_1_residual.npy"), hidden_states[2].numpy(), atol=1e-6)


def test_an_error_mid_run_leaves_no_final_folder(tmp_path):
    model = tiny_model("llama")
    calls = []

    def fail_on_second_batch(done, total, seconds):
        calls.append(done)
        if len(calls) == 2:
            raise RuntimeError("worker lost")

    spec = ExtractionSpec(layers=[0], hook_types=["residual"], seq_len=8, batch_size=1)
    with pytest.raises(RuntimeError):
        run_extraction(model, "llama", Tokens(np.zeros((3, 8), dtype=np.int64), None), spec, tmp_path / "activations" / "extraction_1", {},
                       on_progress=fail_on_second_batch)  # fmt: skip
    assert list((tmp_path / "activations").iterdir()) == []


@pytest.mark.parametrize("layers, hooks, code", [([4], ["residual"], "invalid_layers"), ([-1], ["mlp"], "invalid_layers"),
                                                  ([0], ["logits"], "invalid_hooks"), ([1, 1], ["mlp"], "invalid_layers"),
                                                  ([0], ["mlp", "mlp"], "invalid_layers"), ([], ["mlp"], "invalid_layers"),
                                                  ([0], [], "invalid_hooks")])  # fmt: skip
def test_bad_layers_or_hooks_are_refused_before_anything_is_written(tmp_path, layers, hooks, code):
    spec = ExtractionSpec(layers=layers, hook_types=hooks, seq_len=8, batch_size=1)
    with pytest.raises(JobError) as caught:
        run_extraction(tiny_model("llama"), "llama", Tokens(np.zeros((1, 8), dtype=np.int64), None), spec, tmp_path / "activations" / "extraction_1", {})
    assert caught.value.code == code
    assert not (tmp_path / "activations").exists()


@pytest.mark.parametrize("fmt", ["Q8", "Q4", "Q2"])
def test_quantized_models_are_hooked_exactly_too(fmt, tmp_path):
    """The same hooks on bitsandbytes and HQQ models: what is stored is what that
    quantized model computes (compared with its own hidden states)."""
    from models_app.ml.quantize import load_in_format
    from models_app.tests.support import write_tiny_model

    folder = write_tiny_model(tmp_path / "tiny", vocab_size=300, intermediate_size=256)
    model = load_in_format(folder, fmt, "cpu").eval()
    ids = np.random.default_rng(4).integers(0, 300, size=(3, 12)).astype(np.int64)
    spec = ExtractionSpec(layers=[0], hook_types=list(HOOK_TYPES), seq_len=12, batch_size=3, dtype="float32")
    result = run_extraction(model, "llama", Tokens(ids, None), spec, tmp_path / "activations" / "extraction_q", {})
    hidden_states, captured = reference(model, "llama", ids)
    np.testing.assert_allclose(np.load(result.output_dir / "layer_0_residual.npy"), hidden_states[1].float().numpy(), atol=1e-5)
    np.testing.assert_allclose(np.load(result.output_dir / "layer_0_mlp.npy"), captured[(0, "mlp")].float().numpy(), atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_statistics_over_batches_with_nan_inf_and_padding_match_numpy_on_the_whole_array(dtype):
    """A diverging layer yields NaN/Inf: they are counted and kept out of every other figure,
    whichever batch they fall in; padding never counts."""
    from activations_app.ml.stats import RunningStats

    rng = np.random.default_rng(0)
    values = (rng.standard_normal((6, 10, 32)) * 3).astype(dtype)
    values[1, 2, 3], values[4, 0, 0], values[4, 9, 31] = np.nan, np.inf, -np.inf
    values[0, 0, :4] = [0.005, -0.005, 0.02, 0.0]  # around the sparsity threshold
    values[2, 3, :3] = [6e-8, -3e-5, 2.0**-20]  # float16 subnormals (decoded from their bits)
    values[3, 3, 0] = -6000.0  # the minimum, exactly (padding aside)
    mask = np.ones((6, 10), dtype=bool)
    mask[5, 6:] = False
    values[5, 6:] = 1e4  # padding: large, and must not show up anywhere
    stats = RunningStats(sparsity_threshold=0.01)
    for start in range(0, 6, 2):
        stats.update(values[start : start + 2], mask[start : start + 2])
    figures = stats.result()

    real = values[mask].astype(np.float64)  # [tokens, hidden]
    finite = np.isfinite(real)
    clean = np.where(finite, real, 0.0)
    assert (figures["nan_count"], figures["inf_count"]) == (1, 2)
    assert figures["tokens"] == mask.sum() and figures["elements"] == real.size
    assert figures["max_magnitude"] == np.abs(real[finite]).max() < 1e4
    assert (figures["min"], figures["max"]) == (real[finite].min(), real[finite].max())
    assert figures["mean_magnitude"] == pytest.approx(np.abs(real[finite]).mean(), rel=1e-12)
    assert figures["std"] == pytest.approx(real[finite].std(), rel=1e-9)
    assert figures["mean_l2_norm"] == pytest.approx(np.linalg.norm(clean, axis=1).mean(), rel=1e-12)
    assert figures["sparsity_percent"] == pytest.approx(100 * (np.abs(values[mask]) < 0.01).sum() / real.size, rel=1e-12)


def test_both_float16_widenings_are_exact_over_every_bit_pattern():
    """The statistics read float16 as bits: by the CPU's instruction where it has one (this
    machine does), else by integer arithmetic. Each of the 65,536 patterns comes out as
    numpy's own float16 -> float64, sign, subnormals, Inf and NaN included."""
    import numba

    from activations_app.ml import stats_kernel

    def widen_all_with(widen):
        @numba.njit
        def widen_all(codes):
            out = np.empty(codes.shape[0])
            for i in range(codes.shape[0]):
                out[i] = widen(codes[i])
            return out

        return widen_all

    assert stats_kernel.HALF_INSTRUCTION  # F16C here: both ways are checked
    codes = np.arange(65536, dtype=np.uint16)
    want = codes.view(np.float16).astype(np.float64)
    for widen in (stats_kernel.half_by_instruction, stats_kernel.half_by_arithmetic):
        got = widen_all_with(widen)(codes)
        np.testing.assert_array_equal(got, want)
        assert (np.signbit(got) == np.signbit(want)).all()


class _Stop(Exception):
    """A stop the run can go on from (as a job timeout is)."""


def _stopped_run(model, ids, spec, out):
    def stop_after_first(done, total, seconds):
        if done >= 2:
            raise _Stop()

    with pytest.raises(_Stop):
        run_extraction(model, "llama", Tokens(ids, None), spec, out, {}, stop_after_first, fingerprint="same request",
                       checkpoint_seconds=0)  # fmt: skip


def test_a_resume_over_changed_tokens_starts_over_instead_of_mixing_runs(tmp_path):
    from mistudio.staging import staged_path

    model = tiny_model("llama")
    spec = ExtractionSpec(layers=[1], hook_types=["residual"], seq_len=8, batch_size=2, dtype="float32")
    rng = np.random.default_rng(5)
    first, second = (rng.integers(0, 300, size=(6, 8)).astype(np.int64) for _ in range(2))
    out = tmp_path / "activations" / "extraction_1"
    _stopped_run(model, first, spec, out)
    kept = writer.read_checkpoint(staged_path(out), with_stats=True)
    assert kept is not None and kept["rows"] >= 2  # a checkpoint was kept
    # Its statistics count exactly the rows it names (one file holds both: no kill between two renames can pair them wrongly).
    assert int(kept["stats"]["layer_1_residual/tokens"]) == kept["rows"] * 7  # each row's position 0 left out
    assert sorted(p.name for p in staged_path(out).iterdir() if "checkpoint" in p.name) == ["checkpoint.npz"]
    result = run_extraction(model, "llama", Tokens(second, None), spec, out, {}, fingerprint="same request")
    clean = run_extraction(model, "llama", Tokens(second, None), spec, tmp_path / "clean" / "extraction_2", {})
    assert result.batch_sizes == [2, 2, 2]  # every row ran again
    assert (result.output_dir / "layer_1_residual.npy").read_bytes() == (clean.output_dir / "layer_1_residual.npy").read_bytes()
