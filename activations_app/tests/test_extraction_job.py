"""Extraction from the command line, end to end on the real SmolLM2 and a text dataset."""

import json

import numpy as np
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from activations_app.models import Extraction

pytestmark = pytest.mark.django_db(transaction=True)

TEXT = "\n".join(
    f"Sample {i}: the river runs through the old city, past the bakery and the market." for i in range(40)
)


def last_json_line(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture
def ready_smollm2(hub_with_smollm2, capsys):
    call_command("download_model", "HuggingFaceTB/SmolLM2-135M", "--sync", "--json")
    return last_json_line(capsys)


@pytest.fixture
def dataset(data_dir, capsys):
    path = data_dir / "imports" / "river.txt"
    path.write_text(TEXT)
    call_command("import_dataset", str(path), "--json")
    return last_json_line(capsys)


def test_extract_activations_writes_aligned_files_with_statistics(ready_smollm2, dataset, data_dir, capsys):
    assert dataset["row_count"] == 40
    call_command("extract_activations", ready_smollm2["id"], "--dataset", dataset["id"], "--layers", "0,29",
                 "--hooks", "residual,mlp", "--max-samples", "6", "--batch-size", "4", "--seq-len", "32", "--sync", "--json")  # fmt: skip
    record = last_json_line(capsys)
    assert record["status"] == "completed", record["error_message"]
    out = data_dir / "activations" / f"extraction_{record['id']}"
    assert record["output_path"] == str(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "layer_0_mlp.norms.npy", "layer_0_mlp.npy", "layer_0_mlp.stats.npz",
        "layer_0_residual.norms.npy", "layer_0_residual.npy", "layer_0_residual.stats.npz",
        "layer_29_mlp.norms.npy", "layer_29_mlp.npy", "layer_29_mlp.stats.npz",
        "layer_29_residual.norms.npy", "layer_29_residual.npy", "layer_29_residual.stats.npz",
        "metadata.json", "tokens.npy",
    ]  # fmt: skip
    residual = np.load(out / "layer_29_residual.npy", mmap_mode="r")
    assert residual.shape == (6, 32, 576) and residual.dtype == np.float16
    assert np.load(out / "tokens.npy").shape == (6, 32)
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["model"]["id"] == ready_smollm2["id"] and metadata["statistics"] == record["statistics"]
    assert metadata["compute"] == {"device": "cpu", "dtype": "float32"}
    tokens = np.load(out / "tokens.npy")
    kept = (np.arange(32) > 0) & (tokens != 1)  # position 0 and every BOS (<|im_start|>, SmolLM2's) left out
    assert (tokens[:, 0] == 1).all() and kept.sum() < 6 * 31  # BOS first, and BOS between documents too
    assert record["statistics"]["layer_0_mlp"]["mean_magnitude"] == pytest.approx(
        np.abs(np.load(out / "layer_0_mlp.npy").astype(np.float64)[kept]).mean(), rel=1e-9
    )
    assert Extraction.objects.get().samples_done == 6


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layers", "30"], "out of range"), (["--layers", "-1"], "out of range"), (["--layers", "1,1"], "once"),
        (["--layers", ""], "at least one layer"), (["--hooks", "logits"], "Hook types"),
        (["--batch-size", "0"], "batch_size must be between"), (["--batch-size", "-3"], "batch_size must be between"),
        (["--batch-size", "2.5"], "whole number"), (["--batch-size", "100000"], "batch_size must be between"),
        (["--max-samples", "0"], "max_samples must be between"), (["--seq-len", "9000"], "seq_len must be between 1 and 8,192"),
    ],
)  # fmt: skip
def test_bad_extraction_requests_are_refused_and_write_nothing(smollm2_model, dataset, data_dir, args, message):
    base = {"--layers": "0", "--hooks": "residual", "--max-samples": "4", "--batch-size": "2", "--seq-len": "16"}
    base.update(dict(zip(args[::2], args[1::2])))
    with pytest.raises(CommandError, match=message):
        call_command("extract_activations", smollm2_model.id, "--dataset", dataset["id"],
                     *[item for pair in base.items() for item in pair], "--sync")  # fmt: skip
    assert Extraction.objects.count() == 0
    assert not (data_dir / "activations").exists()
