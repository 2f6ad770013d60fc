"""Fidelity by layer (issue 20, item 1): a model compared with itself is exact, FP16 with its
FP32 source is within float16's precision, and a model with one layer's weights changed is
flagged at that layer and not before. Real transformers models of SmolLM2's family (tiny,
random weights, the real tokenizer) on the shipped text."""

import json

import pytest
import torch
from django.core.management import call_command

from models_app.ml import fidelity
from models_app.tests.test_browser import browser, stack  # noqa: F401 - fixtures

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
    # The reference is on disk for as long as the snapshot: its card counts and names it.
    head = signed_in.get("/").content.decode().split(f'id="model-group-{tiny_model.id}-head"')[1].split("</div>")[0]
    assert "kept to compare new formats by layer" in head and "3 formats" in head

    assert signed_in.get(f"/api/models/{second.id}").json()["fidelity"]["output"]["top1"] == second.fidelity["output"]["top1"]
    call_command("list_models", "--json")
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{") or line.startswith("[")]
    flat = [item for entry in listed for item in (entry if isinstance(entry, list) else [entry])]
    assert any(item["id"] == second.id and item["fidelity"]["layers"] for item in flat)

    for made in (first, second, tiny_model):
        services.delete_model(made.id, None)
    assert not tiny_model.reference_dir.exists()
    assert not Model.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_compare_models_prints_the_table_for_two_ready_models_and_refuses_two_shapes(tiny_model, smollm2_model, capsys):
    from django.core.management.base import CommandError

    call_command("compare_models", tiny_model.id, tiny_model.id, "--tokens", "128")
    out = capsys.readouterr().out
    assert "SmolLM2-tiny FP32 against SmolLM2-tiny FP32: 127 tokens" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == tiny_model.num_layers and all(row[1] == "1.00000" and row[2] == "0.0000" for row in rows)
    assert "KL 0 nats/token, top-1 agreement 100.0 %" in out
    with pytest.raises(CommandError, match=r"\[incomparable_models\].*only models of one shape compare"):
        call_command("compare_models", tiny_model.id, smollm2_model.id)


@pytest.mark.django_db(transaction=True)
def test_the_chart_and_the_extract_dialogs_warning_for_a_model_whose_last_layer_changed(
    stack, browser, user, tiny_model, tiny_smollm2_folder, data_dir, tmp_path
):
    """The fidelity table here is measured, not written by hand: a copy of the tiny model with
    its last block's MLP weights changed, compared with the FP32 reference by the same code a
    quantization runs. Its card, chart, block rows and the Extract dialog show it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from activations_app.services import import_dataset
    from models_app.jobs import fidelity_terms
    from models_app.models import Model
    from models_app.tests.test_browser import sign_in

    tokenizer = AutoTokenizer.from_pretrained(tiny_smollm2_folder)
    fidelity.record(AutoModelForCausalLM.from_pretrained(tiny_smollm2_folder).eval(), tokenizer, tmp_path / "ref", TOKENS, WINDOW)
    changed = AutoModelForCausalLM.from_pretrained(tiny_smollm2_folder).eval()
    last = changed.config.num_hidden_layers - 1
    weight = changed.model.layers[last].mlp.down_proj.weight
    with torch.no_grad():
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)) * weight.std() * 3)
    found = fidelity.compare(changed, tokenizer, tmp_path / "ref", TOKENS, WINDOW)
    found.pop("perplexity"), found.pop("reference_perplexity")
    assert fidelity.first_below(found, 0.99)[0] == last
    q4 = Model.objects.create(name=tiny_model.name, status="ready", architecture=tiny_model.architecture, quantization="Q4",
                              requested_quantization="Q4", architecture_config=tiny_model.architecture_config,
                              params_count=tiny_model.params_count, snapshot_of=tiny_model.id,
                              fidelity={**found, "reference": "FP32", **fidelity_terms()})  # fmt: skip
    (data_dir / "imports" / "f.txt").write_text("\n".join(f"Fidelity line {i} of the corpus." for i in range(30)))
    dataset = import_dataset(path=str(data_dir / "imports" / "f.txt"))

    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    sign_in(page, stack, user.username)
    summary = page.inner_text(f"#model-card-{q4.id} .fidelity-summary")
    assert f"(L{last} " in summary and "lowest cosine with FP32" in summary
    page.click(f"#model-card-{q4.id} .model-open")
    page.wait_for_selector("#architecture-modal .fidelity-chart svg")
    colours = page.eval_on_selector_all(".fidelity-line", "els => els.map(e => [e.dataset.hook, e.getAttribute('stroke')])")
    assert dict(colours) == {"residual": "#c084fc", "attention": "#38bdf8", "mlp": "#34d399"}  # the UI contract's
    assert page.locator(".fidelity-threshold").count() == 1
    flagged = page.eval_on_selector_all("details[data-block]:has(.fidelity-low)", "els => els.map(e => e.dataset.block)")
    assert flagged == [str(last)]  # the changed block only, nothing before it
    page.keyboard.press("Escape")
    page.wait_for_selector("#architecture-modal", state="detached")

    page.click(f"#model-card-{q4.id} .extract-open")
    page.wait_for_selector("#extract-modal")
    page.select_option("#id_dataset", dataset.id)
    page.click(".layer-toggle:has-text('L0')")
    page.wait_for_selector(".estimate-storage", timeout=15_000)
    assert page.locator(".fidelity-warning").count() == 0  # layer 0 is as FP32's
    page.click(f".layer-toggle:has-text('L{last}')")
    warning = page.wait_for_selector(".fidelity-warning", timeout=15_000).inner_text()
    assert f"L{last} residual" in warning or f"L{last} mlp" in warning
    assert "L0 " not in warning
    page.click(".fidelity-source")
    page.wait_for_selector(f"#extract-modal:has-text('{tiny_model.name} • FP32')", timeout=10_000)
    checked = page.eval_on_selector_all("#extract-form [name=layers]:checked", "els => els.map(e => e.value)")
    assert checked == ["0", str(last)] and page.input_value("#id_dataset") == dataset.id
    page.wait_for_selector(".estimate-storage", timeout=15_000)
    assert page.locator(".fidelity-warning").count() == 0  # FP32 is the reference


@pytest.mark.django_db(transaction=True)
def test_a_format_whose_fidelity_cannot_be_measured_still_gets_its_perplexity(tiny_model, settings, monkeypatch):
    """A family whose blocks the comparison cannot hook (its probe refuses them) is made
    anyway, with its perplexity and FP32's, and no fidelity table."""
    from mistudio.errors import JobError
    from models_app import jobs, services

    settings.PERPLEXITY_MAX_TOKENS = 256

    def refuse(*args, **kwargs):
        raise JobError("unsupported_architecture", "Block 0 is not an attention part plus an MLP part.")

    monkeypatch.setattr(fidelity, "compare", refuse)
    made = services.request_quantize(user=None, model_id=tiny_model.id, quantization="FP16", enqueue=False)
    jobs.run_quantize(made.id)
    made.refresh_from_db()
    assert made.status == "ready" and made.fidelity == {}
    assert made.perplexity is not None and made.perplexity_baseline == pytest.approx(fidelity.recorded(tiny_model.reference_dir, 256)["perplexity"])
