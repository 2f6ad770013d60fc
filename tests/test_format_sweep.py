"""Every format × every job that uses a model, generated from the format registry: the
seed's own path (download as Q4 → ready → extract) and then every other format made from
that snapshot, each reloaded in a fresh process, extracted from and exported, on SmolLM2's
family at a tiny size. The extraction's files must hold what that model's own forward
computes (its hidden states, run in the fresh process), and the residual must be the sum of
what its parts add."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from django.core.management import call_command

from activations_app import jobs as extraction_jobs
from activations_app import services as extraction_services
from activations_app.models import ExtractionStatus
from models_app.ml.formats import BYTES_PER_PARAM
from models_app.models import Model
from models_app.tests.hub_server import HubRepo, make_sha
from models_app.tests.support import ROOT, subprocess_env

pytestmark = pytest.mark.django_db(transaction=True)

SEED_FORMAT = "Q4"
BATCH = 4
FORWARD = """
import json, sys
from pathlib import Path
import numpy as np, torch
from models_app.ml import load_saved
for folder, tokens, out, batch in json.loads(sys.argv[1]):
    model = load_saved(Path(folder), "cpu")
    ids = torch.from_numpy(np.load(tokens).astype(np.int64))
    states = []
    with torch.no_grad():
        for start in range(0, len(ids), batch):
            hidden = model(input_ids=ids[start:start + batch], output_hidden_states=True).hidden_states
            states.append(torch.stack([h.float() for h in hidden], 1).numpy())
    np.save(out, np.concatenate(states))
"""


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def relative_error(a, b) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b), 1e-12))


def test_every_format_is_made_reloaded_extracted_and_exported_with_its_own_values(hub, tiny_smollm2_folder, data_dir, user, capsys, tmp_path):
    import datasets

    hub.add_repo(HubRepo("tiny/smollm2", tiny_smollm2_folder, make_sha("tiny/smollm2")))
    call_command("download_model", "tiny/smollm2", "--quantization", SEED_FORMAT, "--sync", "--json")
    seed = last_json(capsys)
    made = {SEED_FORMAT: seed}
    for fmt in BYTES_PER_PARAM:
        if fmt != SEED_FORMAT:
            call_command("quantize_model", seed["id"], "--quantization", fmt, "--sync", "--json")
            made[fmt] = last_json(capsys)
    for fmt, row in made.items():  # a refusal is allowed only where the format cannot run here: none can't
        assert (row["status"], row["quantization"]) == ("ready", fmt), f"{fmt}: {row['error_message']}"

    (data_dir / "imports" / "prose.txt").write_text("\n".join(f"Sentence {i}: the river passes the mill and the bridge." for i in range(60)))
    dataset = extraction_services.import_dataset(path=str(data_dir / "imports" / "prose.txt"), user=user)
    # Not the last block: transformers' last hidden state is after the final norm.
    last = Model.objects.get(pk=seed["id"]).num_layers - 2
    runs, work = {}, []
    for fmt, row in made.items():
        extraction = extraction_services.request_extraction(
            model_id=row["id"], dataset_id=dataset.id, enqueue=False, user=user, layers=[0, last],
            hook_types=["residual", "mlp", "attention"], max_samples=8, batch_size=BATCH, seq_len=16, dtype="float32",
        )  # fmt: skip
        extraction_jobs.run_extraction_job(extraction.id)
        extraction.refresh_from_db()
        assert extraction.status == ExtractionStatus.COMPLETED, f"{fmt}: {extraction.error_message}"
        runs[fmt] = extraction
        work.append([str(Model.objects.get(pk=row["id"]).weights_dir), str(extraction.final_dir / "tokens.npy"),
                     str(tmp_path / f"{fmt}.npy"), BATCH])  # fmt: skip

    # Each model reloaded in a fresh process (no quantizer run again), its own forward pass.
    done = subprocess.run([sys.executable, "-c", FORWARD, json.dumps(work)], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    for fmt, extraction in runs.items():
        hidden = np.load(tmp_path / f"{fmt}.npy")  # [samples, layers + 1, seq, d]
        folder = extraction.final_dir
        for layer in (0, last):
            residual = np.load(folder / f"layer_{layer}_residual.npy")
            assert residual.shape == (8, 16, 64)
            error = relative_error(residual, hidden[:, layer + 1])
            assert error < 1e-3, f"{fmt} layer {layer}: the residual differs from the model's own forward by {error:.2e}"
            before = hidden[:, layer]
            parts = np.load(folder / f"layer_{layer}_attention.npy") + np.load(folder / f"layer_{layer}_mlp.npy")
            assert relative_error(before + parts, residual) < 1e-3, f"{fmt} layer {layer}: residual ≠ previous + attention + mlp"
        export = extraction_services.export_extraction(extraction.id, None, enqueue=False)
        exported = {Path(path).name: Path(path) for path in extraction_jobs.run_export_job(export.id).paths}
        name = f"model.layers.{last}.self_attn"  # the default hook naming: the model's own module paths
        column = datasets.load_from_disk(str(exported[name])).with_format("numpy")
        np.testing.assert_array_equal(column[name], np.load(folder / f"layer_{last}_attention.npy"))
    print(f"\nformat sweep: {len(made)} formats ({', '.join(made)}) × download/quantize, fresh-process reload, extract, export")
