"""Unit tests of the pure pieces: throttle, transfer rate, parameter counting, memory maths."""

import pytest

from mistudio.errors import JobError
from mistudio.throttle import ProgressThrottle, TransferRate
from models_app.ml import loading
from models_app.ml.hub import select_files
from models_app.ml.quantize import estimate_weight_bytes, memory_estimate


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_throttle_lets_through_at_most_one_update_per_half_second_below_one_percent():
    clock = FakeClock()
    throttle = ProgressThrottle(clock=clock)
    assert throttle.should_emit(0.0)
    emitted = 0
    for step in range(1, 100):  # 0.1 % every 10 ms for 1 s
        clock.now = step * 0.01
        emitted += throttle.should_emit(step * 0.001 * 100 / 100)
    assert emitted == 1  # the one at 0.5 s


def test_the_throttle_lets_a_one_percent_jump_through_at_once():
    clock = FakeClock()
    throttle = ProgressThrottle(clock=clock)
    throttle.should_emit(10.0)
    clock.now = 0.01
    assert not throttle.should_emit(10.5)
    assert throttle.should_emit(11.0)


def test_the_throttle_never_repeats_an_unchanged_value_and_always_lets_forced_ones_through():
    clock = FakeClock()
    throttle = ProgressThrottle(clock=clock)
    throttle.should_emit(50.0)
    clock.now = 10
    assert not throttle.should_emit(50.0)
    assert throttle.should_emit(50.0, force=True)


def test_the_transfer_rate_measures_bytes_per_second_and_eta():
    clock = FakeClock()
    rate = TransferRate(clock=clock)
    for second in range(5):
        clock.now = second
        rate.add(second * 2_000_000)
    assert rate.bytes_per_second() == pytest.approx(2_000_000)
    assert rate.eta_seconds(20_000_000) == pytest.approx(6.0)


TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": True,
}  # fmt: skip


def test_full_precision_memory_is_params_times_bytes_times_1_2():
    params = loading.count_parameters(TINY_LLAMA)
    estimate = memory_estimate(TINY_LLAMA)
    assert estimate["FP32"] == round(params * 4 * 1.2)
    assert estimate["FP16"] == round(params * 2 * 1.2)


def test_quantized_memory_counts_only_linear_weights_as_quantized():
    params = loading.count_parameters(TINY_LLAMA)
    linear = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)  # q, k, v, o, gate, up, down per block
    rest = params - linear  # embeddings (tied head) and norms stay float32 on CPU
    q4 = estimate_weight_bytes(TINY_LLAMA, "Q4")
    assert q4 == int(linear * (0.5 + 1 / 64 + 4 / (64 * 256)) + rest * 4)
    q8 = estimate_weight_bytes(TINY_LLAMA, "Q8")
    rows = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)  # one float32 scale per output row
    assert q8 == linear + rows * 4 + rest * 4
    q2 = estimate_weight_bytes(TINY_LLAMA, "Q2")
    assert q2 == int(linear * 0.25 + (linear // 64) * 2 * 4 + rest * 4)  # HQQ: a float32 scale and zero per 64 weights
    assert q2 < q4 < q8 < estimate_weight_bytes(TINY_LLAMA, "FP16")


def test_parameters_are_counted_exactly_from_the_config_with_tied_embeddings_once():
    config = {
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": True,
    }  # fmt: skip
    embed = 512 * 64
    attention = 64 * 64 + 2 * (64 * 32) + 64 * 64  # q, k and v (2 kv heads × 16 dims), o
    mlp = 3 * 64 * 128
    norms = 2 * 64
    expected = embed + 2 * (attention + mlp + norms) + 64
    assert loading.count_parameters(config) == expected
    assert loading.count_parameters({**config, "tie_word_embeddings": False}) == expected + embed


def test_gpt2_is_counted_like_transformers_does():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 100, "n_positions": 64}
    reference = GPT2LMHeadModel(GPT2Config(**{k: v for k, v in config.items() if k != "model_type"}))
    assert loading.count_parameters(config) == reference.num_parameters()


@pytest.mark.parametrize("model_type, phrase", [("bert", "encoder-only"), ("t5", "encoder-decoder"), ("mamba", "is not an attention part plus an MLP part")])
def test_architectures_we_cannot_hook_are_refused_with_the_reason(model_type, phrase):
    with pytest.raises(JobError) as caught:
        loading.check_architecture({"model_type": model_type})
    assert caught.value.code == "unsupported_architecture"
    assert phrase in caught.value.message


def test_safetensors_are_chosen_over_bin_and_subfolders_are_skipped():
    sizes = {
        "config.json": 1, "tokenizer.json": 2, "model.safetensors": 10, "pytorch_model.bin": 10,
        "original/consolidated.00.pth": 99, "onnx/model.onnx": 5, "README.md": 1,
    }  # fmt: skip
    assert select_files(sizes) == ["config.json", "tokenizer.json", "model.safetensors"]


def test_bin_weights_are_used_when_there_are_no_safetensors():
    assert select_files({"config.json": 1, "pytorch_model.bin": 5}) == ["config.json", "pytorch_model.bin"]


def test_a_repo_without_weights_is_refused():
    with pytest.raises(JobError) as caught:
        select_files({"config.json": 1, "model.Q4_K_M.gguf": 5})
    assert caught.value.code == "no_weights"


def test_the_bitsandbytes_cast_warning_reaches_the_job_log_once_not_per_matmul(caplog):
    """Configured by settings.LOGGING: Q8 on CPU would otherwise log one line per int8 matmul."""
    import logging

    import torch
    from bitsandbytes.autograd import _functions

    logger = logging.getLogger(_functions.__name__)
    assert logger is _functions.logger
    with caplog.at_level(logging.WARNING):
        for _ in range(50):
            logger.warning("MatMul8bitLt (test): inputs will be cast from %s to float16", torch.float32)
        logger.warning("another message (test) %s", 1)
    seen = [r.getMessage() for r in caplog.records if r.name == logger.name]
    assert seen == ["MatMul8bitLt (test): inputs will be cast from torch.float32 to float16", "another message (test) 1"]


def test_the_progress_writer_never_blocks_the_job_and_writes_the_last_state_last():
    """Jobs hand progress to LatestStateWriter; a slow database or channel layer must not slow
    the download threads or the forward pass, and the row must end at the final figure."""
    import time

    from mistudio.progress import LatestStateWriter

    written = []

    def slow_write(state):
        time.sleep(0.05)
        written.append(state["done"])

    writer = LatestStateWriter(slow_write, name="test-writer", max_per_second=10)
    started = time.monotonic()
    for done in range(1, 501):
        writer.submit({"done": done})
    submitting = time.monotonic() - started
    writer.flush()
    assert submitting < 0.05  # 500 hand-overs took less than one write
    assert written[-1] == 500 and len(written) <= 3  # coalesced: only the newest state is written
    assert written == sorted(written)


def test_the_progress_writer_hands_a_cancellation_back_to_the_job():
    import time

    from mistudio.errors import JobCancelled
    from mistudio.progress import LatestStateWriter

    def write(state):
        if state["done"] >= 2:
            raise JobCancelled()

    writer = LatestStateWriter(write, name="test-writer")
    writer.submit({"done": 1})
    writer.submit({"done": 2})
    deadline = time.monotonic() + 5
    with pytest.raises(JobCancelled):
        while time.monotonic() < deadline:
            writer.check()  # what the forward loop calls before each batch
            time.sleep(0.01)
    with pytest.raises(JobCancelled):
        writer.flush()
    writer.flush(raise_error=False)  # a job already failing for another reason keeps its own error


def test_a_sharded_repo_with_mistrals_consolidated_file_fetches_only_the_shards():
    sizes = {"config.json": 1, "tokenizer.json": 1, "consolidated.safetensors": 14_000,
             "model-00001-of-00002.safetensors": 7_000, "model-00002-of-00002.safetensors": 7_000,
             "model.safetensors.index.json": 1}  # fmt: skip
    assert select_files(sizes) == ["config.json", "tokenizer.json", "model-00001-of-00002.safetensors",
                                   "model-00002-of-00002.safetensors", "model.safetensors.index.json"]  # fmt: skip


def test_q2_is_judged_by_the_full_precision_load_it_is_made_from():
    """HQQ quantizes a model loaded in float32 (CPU) / float16 (GPU): a budget that holds
    Q2's result but not that load gets Q4, whose bitsandbytes load quantizes layer by layer."""
    from models_app.ml.quantize import choose_format

    estimates = {"FP32": 400, "FP16": 200, "Q8": 110, "Q4": 60, "Q2": 35}
    assert choose_format("Q2", estimates, 500, "cpu") == ("Q2", [])
    fmt, notes = choose_format("Q2", estimates, 300, "cpu")
    assert fmt == "Q4" and "while it is made" in notes[0]
    assert choose_format("Q2", estimates, 300, "cuda") == ("Q2", [])  # the float16 load fits on a GPU
    assert choose_format("Q8", estimates, 100, "cpu")[0] == "Q4"
    with pytest.raises(JobError) as caught:
        choose_format("Q4", estimates, 50, "cpu")
    assert "even Q2 needs 35 B (400 B while it is made)" in caught.value.message
