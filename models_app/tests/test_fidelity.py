"""Fidelity by layer (issue 20, item 1): a model compared with itself is exact, FP16 with its
FP32 source is within float16's precision, and a model with one layer's weights changed is
flagged at that layer and not before. Real transformers models of SmolLM2's family (tiny,
random weights, the real tokenizer) on the shipped text."""

import json

import pytest
import torch
from django.core.management import call_command

from models_app.ml import fidelity

WINDOW, TOKENS = 64, 256  # four windows of the shipped text: the test's cost, not the figure's


@pytest.fixture(scope="module")
def tiny(tiny_smollm2_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_smollm2_folder, torch_dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_smollm2_folder)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    model, tokenizer = tiny
    folder = tmp_path_factory.mktemp("reference")
    info = fidelity.record(model, tokenizer, folder, TOKENS, WINDOW)
    return folder, info


def test_a_model_compared_with_itself_is_exact(tiny, reference):
    model, tokenizer = tiny
    folder, info = reference
    assert info["tokens"] == TOKENS - TOKENS // WINDOW  # position 0 of each window left out
    found = fidelity.compare(model, tokenizer, folder, TOKENS, WINDOW)
    assert len(found["layers"]) == model.config.num_hidden_layers
    for row in found["layers"]:
        for hook in fidelity.HOOKS:
            assert row[hook]["cosine"] == pytest.approx(1.0, abs=1e-12), (row["layer"], hook)
            assert row[hook]["rel_error"] == 0.0 and row[hook]["fvu"] == 0.0, (row["layer"], hook)
    assert found["output"] == {"kl": 0.0, "top1": 1.0}
    assert found["perplexity"] == pytest.approx(info["perplexity"])


def test_fp16_compared_with_its_fp32_source_is_within_float16s_precision(tiny, reference, tiny_smollm2_folder):
    from transformers import AutoModelForCausalLM

    _, tokenizer = tiny
    half = AutoModelForCausalLM.from_pretrained(tiny_smollm2_folder, torch_dtype=torch.float16).eval()
    found = fidelity.compare(half, tokenizer, reference[0], TOKENS, WINDOW)
    worst = fidelity.weakest(found)
    print(f"\nFP16 vs FP32: lowest cosine {worst}, largest relative error "
          f"{max(row[h]['rel_error'] for row in found['layers'] for h in fidelity.HOOKS):.2e}, KL {found['output']['kl']:.2e}")
    for row in found["layers"]:
        for hook in fidelity.HOOKS:
            # float16 keeps 11 significant bits (2^-11 ≈ 4.9e-4 relative): a few roundings per layer.
            assert row[hook]["rel_error"] < 2e-2 and row[hook]["cosine"] > 0.9998, (row["layer"], hook, row[hook])
    assert found["output"]["kl"] < 1e-3 and found["output"]["top1"] > 0.98


def test_a_model_with_one_layers_weights_perturbed_is_flagged_at_that_layer_and_not_before(tiny, reference, tiny_smollm2_folder):
    from transformers import AutoModelForCausalLM

    _, tokenizer = tiny
    changed = AutoModelForCausalLM.from_pretrained(tiny_smollm2_folder, torch_dtype=torch.float32).eval()
    layer = 2
    weight = changed.model.layers[layer].mlp.down_proj.weight
    with torch.no_grad():
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * weight.std() * 2)
    found = fidelity.compare(changed, tokenizer, reference[0], TOKENS, WINDOW)
    assert fidelity.first_below(found, 0.99)[0] == layer
    for row in found["layers"][:layer]:
        assert all(row[hook]["rel_error"] == 0.0 for hook in fidelity.HOOKS), row  # untouched: identical
    at = found["layers"][layer]
    assert at["attention"]["rel_error"] == 0.0  # attention runs before the changed MLP in the block
    assert at["mlp"]["cosine"] < 0.9 and at["mlp"]["fvu"] > 0.1


@pytest.mark.django_db(transaction=True)
def test_a_quantization_stores_its_fidelity_and_shares_the_fp32_reference(tiny_model, settings, signed_in, capsys):
    from models_app import jobs, services
    from models_app.models import Model

    settings.PERPLEXITY_MAX_TOKENS = 512
    first = services.request_quantize(user=None, model_id=tiny_model.id, quantization="FP16", enqueue=False)
    jobs.run_quantize(first.id)
    first.refresh_from_db()
    assert first.status == "ready", first.error_message
    table = first.fidelity
    assert table["reference"] == "FP32" and len(table["layers"]) == tiny_model.num_layers and table["tokens"] == 511
    assert table["excluded"] == "position 0 of each window and BOS tokens"
    assert min(row["residual"]["cosine"] for row in table["layers"]) > 0.999
    recorded = fidelity.recorded(tiny_model.reference_dir, 512)
    assert recorded is not None and recorded["perplexity"] == pytest.approx(first.perplexity_baseline)
    stamp = (tiny_model.reference_dir / "reference.json").stat().st_mtime_ns

    second = services.request_quantize(user=None, model_id=tiny_model.id, quantization="Q8", enqueue=False)
    jobs.run_quantize(second.id)
    second.refresh_from_db()
    assert second.status == "ready" and second.fidelity["layers"]
    assert (tiny_model.reference_dir / "reference.json").stat().st_mtime_ns == stamp  # recorded once, shared

    assert signed_in.get(f"/api/models/{second.id}").json()["fidelity"]["output"]["top1"] == second.fidelity["output"]["top1"]
    call_command("list_models", "--json")
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{") or line.startswith("[")]
    flat = [item for entry in listed for item in (entry if isinstance(entry, list) else [entry])]
    assert any(item["id"] == second.id and item["fidelity"]["layers"] for item in flat)

    for made in (first, second, tiny_model):
        services.delete_model(made.id, None)
    assert not tiny_model.reference_dir.exists()
    assert not Model.objects.exists()
