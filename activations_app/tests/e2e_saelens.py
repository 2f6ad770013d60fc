"""SAELens trains from a miStudio export with no glue code (issue 18): the model downloaded
from the (loopback) Hub, an extraction with the defaults, `export_activations` with its
default naming, then SAELens (its own venv, .venv-saelens: SAELENS_VERSION, which needs a
TransformerLens older than the benchmark's) trains a few hundred steps from each hook with
a config built from export.json alone. Both naming schemes, each through the loading path
SAELens has for that model's family:
- `hf` (module paths) through `AutoModelForCausalLM`: SmolLM2-135M;
- `tl` (TransformerLens names) through `HookedTransformer`, which loads only models it
  knows by name: a Pythia-shaped model served under `EleutherAI/pythia-14m` (random
  weights: the loopback Hub cannot serve the real one; the loading path is what is tested).

Run with `scripts/saelens-e2e` (it builds the venv once); not part of the timed suite."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from django.core.management import call_command

from activations_app.tests.test_resume import TEXT
from models_app.tests.hub_server import HubRepo, make_sha
from models_app.tests.support import ROOT, write_model_from_config

pytestmark = pytest.mark.django_db(transaction=True)
PYTHON = Path(os.environ.get("MISTUDIO_SAELENS_PYTHON", ROOT / ".venv-saelens" / "bin" / "python"))
STEPS = 300


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def train(export_dir: Path, hook: str, hub, tmp_path) -> dict:
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "WANDB_MODE": "disabled", "PYTHONPATH": ""}  # fmt: skip
    env.pop("DJANGO_SETTINGS_MODULE", None)
    done = subprocess.run([str(PYTHON), str(Path(__file__).with_name("saelens_train.py")), str(export_dir), hook, str(STEPS)],
                          capture_output=True, text=True, env=env, timeout=900, cwd=export_dir)  # fmt: skip
    assert done.returncode == 0, done.stderr[-6000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def trains_every_hook(export_dir: Path, hooks: list[str], hub, tmp_path, model_class_name: str, d_in: int) -> None:
    for hook in hooks:
        result = train(export_dir, hook, hub, tmp_path)
        print(json.dumps(result))
        assert result["finite"] and result["model_class_name"] == model_class_name and result["d_in"] == d_in
        # SAELens' own model (transformers' or TransformerLens') has these values at that name,
        # to the float16 storage's precision.
        assert result["hook_relative_error"] < 5e-3, result
        assert result["explained_variance"] > 0.3, result


def extract_and_export(repo_id: str, layers: str, data_dir, tmp_path, capsys) -> tuple[dict, list[str]]:
    call_command("download_model", repo_id, "--sync", "--json")
    model = last_json(capsys)
    assert model["status"] == "ready", model["error_message"]
    (data_dir / "imports" / "river.txt").write_text(TEXT)
    call_command("import_dataset", str(data_dir / "imports" / "river.txt"), "--json")
    dataset = last_json(capsys)
    call_command("extract_activations", model["id"], "--dataset", dataset["id"], "--layers", layers, "--hooks", "residual,mlp",
                 "--max-samples", "64", "--batch-size", "8", "--seq-len", "32", "--sync", "--json")  # fmt: skip
    extraction = last_json(capsys)
    assert extraction["status"] == "completed", extraction["error_message"]
    out = tmp_path / "export"
    call_command("export_activations", extraction["id"], "--out", str(out), "--shuffle", "1")
    said = capsys.readouterr().err
    assert "LanguageModelSAERunnerConfig(" in said
    record = json.loads((out / "export.json").read_text())
    return record, record["hooks"]


def test_saelens_trains_from_an_hf_named_export_of_smollm2(hub_with_smollm2, data_dir, tmp_path, capsys):
    record, hooks = extract_and_export("HuggingFaceTB/SmolLM2-135M", "3", data_dir, tmp_path, capsys)
    assert record["naming"] == "hf" and hooks == ["model.layers.3", "model.layers.3.mlp"]
    trains_every_hook(tmp_path / "export", hooks, hub_with_smollm2, tmp_path, "AutoModelForCausalLM", 576)


@pytest.fixture
def pythia_shaped(hub, smollm2_folder, tmp_path_factory):
    """A GPT-NeoX (Pythia's architecture) at a tiny size, random weights, served as
    EleutherAI/pythia-14m: a repo TransformerLens loads by name."""
    folder = tmp_path_factory.mktemp("pythia-shaped")
    config = dict(model_type="gpt_neox", hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                  vocab_size=49152, max_position_embeddings=256, rotary_pct=0.25, use_parallel_residual=True,
                  bos_token_id=1, eos_token_id=2)  # fmt: skip
    write_model_from_config(folder, config, seed=3)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((smollm2_folder / name).read_bytes())
    hub.add_repo(HubRepo("EleutherAI/pythia-14m", folder, make_sha("EleutherAI/pythia-14m")))
    return hub


def test_saelens_trains_from_a_tl_named_export_through_hooked_transformer(pythia_shaped, data_dir, tmp_path, capsys):
    record, hooks = extract_and_export("EleutherAI/pythia-14m", "1", data_dir, tmp_path, capsys)
    assert record["naming"] == "tl" and hooks == ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"]
    trains_every_hook(tmp_path / "export", hooks, pythia_shaped, tmp_path, "HookedTransformer", 64)
