"""Issue 20, item 3: Q4 made tensor by tensor from the mapped safetensors shards, for
models whose weights do not fit in memory. What it writes must be what transformers'
own bitsandbytes path writes, byte for byte, so every reload and figure stays the same;
the 13B and 7B memory rows are in scripts/bench (models_app/tests/bench_13b.py)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mistudio.errors import JobError
from models_app.ml import quantize
from models_app.tests import support


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for shard in quantize._safetensors_shards(folder):
        with safe_open(str(shard), framework="pt") as f:
            found |= {key: f.get_tensor(key) for key in f.keys()}
    return found


def as_stored_on_the_hub(folder: Path, shard_size: str) -> Path:
    """Re-save a written model in float16 shards, as 7B/13B repos come."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16)
    target = folder.with_name(folder.name + "-fp16")
    model.save_pretrained(target, max_shard_size=shard_size)
    return target


@pytest.mark.parametrize("fmt", ["Q4", "Q8"])
@pytest.mark.parametrize(
    "family, overrides",
    [
        ("llama", {}),  # separate head
        ("llama", {"tie_word_embeddings": True}),  # the head is the embedding (SmolLM2)
        ("gpt2", {}),  # Conv1D weights, stored transposed
    ],
    ids=["llama", "llama-tied", "gpt2-conv1d"],
)
def test_streamed_q8_and_q4_write_what_transformers_writes_byte_for_byte(tmp_path, monkeypatch, family, overrides, fmt):
    src = as_stored_on_the_hub(support.write_tiny_model(tmp_path / family, family, **overrides), "150KB")
    assert len(quantize._safetensors_shards(src)) >= 2  # read shard by shard
    whole = tmp_path / "transformers"
    quantize.save_in_format(quantize.load_in_format(src, fmt, "cpu"), fmt, src, whole)

    monkeypatch.setattr(quantize, "STREAM_SHARD_BYTES", 60_000)  # several output shards, and their index
    plan = quantize.stream_plan(src, fmt, "cpu")
    assert isinstance(plan, quantize.StreamPlan), plan
    streamed = tmp_path / "streamed"
    quantize.quantize_streamed(plan, src, streamed, "cpu")

    assert (streamed / "model.safetensors.index.json").is_file()
    expected, got = tensors(whole), tensors(streamed)
    assert sorted(got) == sorted(expected)
    marker = "quant_state.bitsandbytes__nf4" if fmt == "Q4" else ".SCB"
    assert sum(key.endswith(marker) for key in got) == len(plan.quantized) > 0
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    assert json.loads((streamed / "config.json").read_text()) == json.loads((whole / "config.json").read_text())

    # It reloads as 4-bit layers and computes exactly what transformers' Q4 computes.
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    a, b = quantize.load_saved(whole, "cpu"), quantize.load_saved(streamed, "cpu")
    assert any(type(m).__name__ == {"Q4": "Linear4bit", "Q8": "Linear8bitLt"}[fmt] for m in b.modules())
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_progress_is_by_bytes_and_moves_with_every_tensor_to_the_total(tmp_path):
    src = as_stored_on_the_hub(support.write_tiny_model(tmp_path / "llama", "llama"), "150KB")
    plan = quantize.stream_plan(src, "Q4", "cpu")
    seen = []
    quantize.quantize_streamed(plan, src, tmp_path / "q4", "cpu", lambda done, total: seen.append((done, total)))
    stored = sum(shard.stat().st_size for shard in quantize._safetensors_shards(src))
    assert {total for _, total in seen} == {stored}
    done = [d for d, _ in seen]
    assert done == sorted(done) and done[-1] == stored
    assert len(set(done)) > len(tensors(src)) // 2  # tensor by tensor, not shard by shard


def test_a_damaged_shard_fails_the_stream_and_leaves_no_folder(tmp_path):
    src = as_stored_on_the_hub(support.write_tiny_model(tmp_path / "llama", "llama"), "150KB")
    plan = quantize.stream_plan(src, "Q4", "cpu")
    last = quantize._safetensors_shards(src)[-1]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a shard cut short on disk
    target = tmp_path / "q4"
    with pytest.raises(Exception):
        quantize.quantize_streamed(plan, src, target, "cpu")
    assert not target.exists() and not list(tmp_path.glob(".q4*"))


def test_a_checkpoint_whose_names_are_not_the_models_goes_transformers_way_and_says_why(tmp_path):
    src = support.write_tiny_model(tmp_path / "llama", "llama")
    state = load_file(str(src / "model.safetensors"))
    save_file({f"transformer.{key}": value for key, value in state.items()}, str(src / "model.safetensors"))
    reason = quantize.stream_plan(src, "Q4", "cpu")
    assert isinstance(reason, str) and "names weights" in reason
    assert quantize.stream_plan(support.write_tiny_model(tmp_path / "ok", "llama"), "Q8", "cuda") == "made on the GPU by transformers as it loads"


@pytest.mark.django_db(transaction=True)
def test_a_q4_job_shows_its_bytes_while_it_streams_and_keeps_the_downloads_figures(data_dir, tmp_path):
    from django.template.loader import render_to_string

    from conftest import ready_model_record
    from models_app import jobs, services

    src = as_stored_on_the_hub(support.write_tiny_model(tmp_path / "llama", "llama"), "150KB")
    source = ready_model_record(src, "tiny-llama-sharded")
    source.bytes_done = source.bytes_total = 123_456
    source.save()
    made = services.request_quantize(user=None, model_id=source.id, quantization="Q4", enqueue=False)
    made.bytes_done = made.bytes_total = 123_456  # as a download that went on to quantize leaves them
    made.save()
    seen, cards = [], []

    def watch(row):
        seen.append((row.status, row.progress, row.bytes_done, row.bytes_total))
        if row.status == "quantizing" and row.bytes_total and not cards:
            cards.append(render_to_string("models_app/_card.html", {"model": row}))

    jobs.run_quantize(made.id, listener=watch)
    made.refresh_from_db()
    assert (made.status, made.quantization) == ("ready", "Q4"), made.error_message
    stored = sum(shard.stat().st_size for shard in quantize._safetensors_shards(src))
    streaming = [(p, d) for status, p, d, total in seen if status == "quantizing" and total == stored]
    assert len(streaming) >= 2 and streaming == sorted(streaming), seen
    assert streaming[-1][1] == stored and 15.0 <= streaming[0][0] and streaming[-1][0] <= 60.0
    assert "transfer-stats" in cards[0] and " / " in cards[0].split("transfer-stats")[1]
    assert (made.bytes_done, made.bytes_total) == (123_456, 123_456)  # the download's figures, back when it ends
    assert not [row for row in seen if row[0] == "quantizing" and row[3] == 123_456], seen  # never beside the quantizing bar
    assert made.quantized_path and Path(made.quantized_path, "model.safetensors").is_file()


@pytest.mark.django_db
def test_the_estimate_before_download_says_what_this_machine_can_make_and_what_the_disk_holds(
    signed_in, hub_with_smollm2, smollm2_folder, settings
):
    from mistudio.hub import format_bytes

    config = json.loads((smollm2_folder / "config.json").read_text())
    memory = quantize.memory_estimate(config, "cpu")
    settings.GPU_MEMORY_LIMIT = (memory["FP16"] + memory["Q8"]) // 2  # a machine where FP32 and FP16 do not fit

    def estimate() -> str:
        return signed_in.post("/models/estimate", {"repo_id": "HuggingFaceTB/SmolLM2-135M"}, HTTP_HX_REQUEST="true").content.decode()

    html = estimate()
    note = html.split('class="machine-note')[1].split("</p>")[0]
    assert "This machine makes Q8, Q4 as asked; FP32 would be made as Q8; FP16 would be made as Q8; Q2 would be made as Q4" in note
    assert f"Q8 and Q4 are quantized tensor by tensor from the shards, so FP16 (which needs {format_bytes(memory['FP16'])} loaded)" in note
    disk = html.split('class="disk-note')[1].split("</p>")[0]
    assert "text-slate-400" in disk and "free; a quantized format adds its own size" in disk

    settings.DISK_RESERVE_BYTES = 1 << 60  # a full disk
    disk = estimate().split('class="disk-note')[1].split("</p>")[0]
    assert "text-yellow-400" in disk and "more than the" in disk and "free some first" in disk


def sharded_record(tmp_path):
    from conftest import ready_model_record

    src = as_stored_on_the_hub(support.write_tiny_model(tmp_path / "llama", "llama"), "150KB")
    return src, ready_model_record(src, "tiny-llama-sharded")


@pytest.mark.django_db(transaction=True)
def test_a_disk_too_full_for_the_quantized_model_is_said_before_quantizing_and_keeps_nothing(data_dir, tmp_path, settings):
    from models_app import jobs, services

    _, source = sharded_record(tmp_path)
    made = services.request_quantize(user=None, model_id=source.id, quantization="Q4", enqueue=False)
    settings.DISK_RESERVE_BYTES = 1 << 60
    seen = []
    with pytest.raises(JobError):  # re-raised for RQ (and a --sync command) to record, once the row says it
        jobs.run_quantize(made.id, listener=lambda row: seen.append((row.status, row.bytes_done)))
    made.refresh_from_db()
    assert (made.status, made.error_code) == ("error", "insufficient_disk_space")
    assert made.error_message.startswith("Not enough disk space: the Q4 model needs")
    assert not [done for status, done in seen if status == "quantizing" and done]  # nothing was quantized
    assert not (data_dir / "models" / "quantized").exists() or not any((data_dir / "models" / "quantized").iterdir())


@pytest.mark.django_db(transaction=True)
def test_a_quantization_cancelled_as_it_starts_streaming_is_not_reloaded_and_keeps_no_folder(data_dir, tmp_path, monkeypatch):
    """Cancelled from another tab as the weights' step begins: the stream stops at its next
    progress write, or at the latest when it ends, before the model is loaded from it; the
    row is cancelled, no folder or staged sibling is left, the user's snapshot is untouched."""
    from models_app import jobs, services
    from models_app.models import Model

    src, source = sharded_record(tmp_path)
    made = services.request_quantize(user=None, model_id=source.id, quantization="Q4", enqueue=False)
    loads = []
    real_load = quantize.load_saved

    def cancel_as_the_weights_step_begins(row):
        if row.status == "quantizing" and row.progress == jobs.REFERENCE_END and not row.bytes_total:
            services.cancel_model(row.id, None)

    monkeypatch.setattr(quantize, "load_saved", lambda *args, **kwargs: loads.append(args) or real_load(*args, **kwargs))
    jobs.run_quantize(made.id, listener=cancel_as_the_weights_step_begins)
    made = Model.objects.get(pk=made.pk)
    assert made.status == "cancelled" and loads == []
    quantized = data_dir / "models" / "quantized"
    assert not quantized.exists() or not any(quantized.iterdir())  # neither the folder nor its staged sibling
    assert src.is_dir() and len(quantize._safetensors_shards(src)) >= 2  # the snapshot is the user's: untouched
