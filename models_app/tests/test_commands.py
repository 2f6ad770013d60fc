"""The management commands as a researcher uses them in a terminal."""

import json
import shutil

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from models_app.models import Model, ModelStatus
from models_app.tests.support import SMOLLM2_PARAMS, run_burst_worker, smollm2_gguf

pytestmark = pytest.mark.django_db(transaction=True)


def last_json_line(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_import_of_a_model_folder_copies_it_and_counts_its_parameters(data_dir, tiny_repo_folder, capsys):
    folder = data_dir / "imports" / "my-tiny-llama"
    shutil.copytree(tiny_repo_folder, folder)
    call_command("import_model", str(folder), "--name", "tiny", "--sync", "--json")
    record = last_json_line(capsys)
    assert (record["status"], record["name"], record["architecture"]) == ("ready", "tiny", "llama")
    raw = data_dir / "models" / "raw" / record["id"]
    assert (raw / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert record["disk_size_bytes"] == sum(p.stat().st_size for p in raw.iterdir())


def test_import_of_a_truncated_safetensors_fails_and_leaves_no_files(data_dir, tiny_repo_folder):
    folder = data_dir / "imports" / "broken"
    shutil.copytree(tiny_repo_folder, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CommandError, match="invalid_model"):
        call_command("import_model", str(folder), "--sync")
    model = Model.objects.get()
    assert model.status == ModelStatus.ERROR
    assert not (data_dir / "models" / "raw" / model.id).exists()


def test_import_of_the_smollm2_gguf_dequantizes_a_model_that_still_knows_paris(settings, data_dir, capsys):
    gguf = smollm2_gguf()
    settings.IMPORT_ROOTS = [*settings.IMPORT_ROOTS, gguf.parent.resolve()]
    call_command("import_model", str(gguf), "--sync", "--json")
    record = last_json_line(capsys)
    assert record["status"] == "ready", record["error_message"]
    assert record["params_count"] == SMOLLM2_PARAMS
    assert record["source"] == "gguf"

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    raw = data_dir / "models" / "raw" / record["id"]
    tokenizer = AutoTokenizer.from_pretrained(raw)
    model = AutoModelForCausalLM.from_pretrained(raw, dtype=torch.float32)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0][ids["input_ids"].shape[1]:])


def test_download_without_sync_queues_for_a_worker_and_list_models_shows_it(hub, capsys):
    call_command("download_model", "tiny/llama", "--quantization", "fp16", "--json")
    queued = last_json_line(capsys)
    assert queued["status"] == "queued" and queued["quantization"] == "FP16"
    assert run_burst_worker().returncode == 0
    call_command("list_models")
    listing = capsys.readouterr().out
    assert queued["id"] in listing and "ready" in listing and "FP16" in listing
    call_command("list_models", "--json")
    assert last_json_line(capsys)[0]["status"] == "ready"


def test_token_env_reads_the_token_from_the_named_variable_only(hub, monkeypatch):
    from conftest import GATED_TOKEN

    monkeypatch.setenv("MY_HF_TOKEN", GATED_TOKEN)
    call_command("download_model", "tiny/gated", "--token-env", "MY_HF_TOKEN", "--sync")
    assert Model.objects.get().status == ModelStatus.READY
    with pytest.raises(CommandError, match="NOT_SET is not set"):
        call_command("download_model", "tiny/gated", "--token-env", "NOT_SET")


def test_delete_model_removes_the_files_and_is_harmless_twice(hub, data_dir, capsys):
    call_command("download_model", "tiny/llama", "--sync", "--json")
    record = last_json_line(capsys)
    call_command("delete_model", record["id"], "--json")
    assert last_json_line(capsys) == {"id": record["id"], "deleted": True}
    assert not (data_dir / "models" / "raw" / record["id"]).exists()
    call_command("delete_model", record["id"])
    assert "nothing to do" in capsys.readouterr().out


def test_a_failed_command_exits_non_zero_with_one_line_on_stderr(hub):
    import subprocess
    import sys

    from models_app.tests.support import ROOT, subprocess_env

    result = subprocess.run(
        [sys.executable, "manage.py", "download_model", "nobody/nothing", "--sync"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("CommandError")]
    assert len(error_lines) == 1 and "[repo_not_found]" in error_lines[0], result.stderr


def test_a_gpt2_checkpoint_with_the_hubs_key_names_and_mask_buffers_imports_ready(data_dir, capsys):
    """openai-community/gpt2 stores `h.0.attn.bias` (the causal mask, a buffer) under names
    without the `transformer.` prefix: it is a complete checkpoint, not a mismatched one."""
    import torch
    from safetensors.torch import load_file, save_file

    from models_app.tests.support import write_tiny_model

    folder = write_tiny_model(data_dir / "imports" / "gpt2", "gpt2")
    state = {name.removeprefix("transformer."): t for name, t in load_file(str(folder / "model.safetensors")).items()}
    state.pop("lm_head.weight", None)
    for layer in range(2):
        state[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(1, 1, 256, 256))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    call_command("import_model", str(folder), "--sync", "--json")
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (record["status"], record["architecture"]) == ("ready", "gpt2"), record["error_message"]
