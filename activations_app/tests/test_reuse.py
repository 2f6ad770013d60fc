"""Reuse instead of recompute (issue 18, item 4): a request whose files a finished
extraction already holds for the same model, data and tokenization takes them (hard links,
no forward pass); a superset computes only what is missing; a source of more rows gives its
first rows; anything whose rows differ is computed. The timings (a repeated request under
5 % of the first's, on SmolLM2) are in scripts/bench."""

from __future__ import annotations

import html
import json

import numpy as np
import pytest

from activations_app import jobs, services
from activations_app.ml.extract import ExtractionSpec, run_extraction
from activations_app.ml.tokens import tokenize
from activations_app.models import Extraction, ExtractionStatus

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def lines(data_dir):
    (data_dir / "imports" / "rivers.txt").write_text("\n".join(f"Line {i}: the river bends east past mill {i}." for i in range(60)))
    return services.import_dataset(path=str(data_dir / "imports" / "rivers.txt"))


def extract(model, dataset, **fields) -> Extraction:
    request = {"layers": [0], "hook_types": ["residual"], "max_samples": 8, "batch_size": 4, "seq_len": 16, **fields}
    row = services.request_extraction(model_id=model.id, dataset_id=dataset.id, enqueue=False, **request)
    jobs.run_extraction_job(row.id)
    row.refresh_from_db()
    assert row.status == ExtractionStatus.COMPLETED, row.error_message
    return row


def metadata(row: Extraction) -> dict:
    return json.loads((row.final_dir / "metadata.json").read_text())


def as_stored(figures: dict) -> dict:
    return json.loads(json.dumps(figures))


def direct_run(model_row, dataset, tmp_path, **fields):
    """The same request run by run_extraction alone (no database, nothing to reuse): what
    the files must hold."""
    from transformers import AutoTokenizer

    from models_app.ml import load_saved

    spec = ExtractionSpec(**{"layers": [0], "hook_types": ["residual"], "max_samples": 8, "batch_size": 4, "seq_len": 16, **fields})
    tokenizer = AutoTokenizer.from_pretrained(model_row.weights_dir)
    tokens = tokenize(dataset.texts(), tokenizer, spec.seq_len, spec.tokenization, spec.max_samples, spec.prepend_bos, spec.separator)
    return run_extraction(load_saved(model_row.weights_dir), model_row.architecture, tokens, spec, tmp_path / "direct" / "extraction_x", {},
                          decode=lambda token: tokenizer.decode([token]))  # as the job names the outliers' tokens


def test_a_repeated_request_takes_the_files_as_hard_links_without_a_forward_pass_and_either_can_be_deleted(tiny_model, lines, monkeypatch):
    first = extract(tiny_model, lines, layers=[0, 1], hook_types=["residual", "mlp"])
    # The repeat must not load the model at all: a load now fails the job.
    monkeypatch.setattr(jobs, "load_saved", lambda *a, **k: pytest.fail("the model was loaded for a request whose files all exist"))
    second = extract(tiny_model, lines, layers=[0, 1], hook_types=["residual", "mlp"])
    names = sorted(path.name for path in first.final_dir.iterdir() if path.name != "metadata.json")
    assert names == sorted(path.name for path in second.final_dir.iterdir() if path.name != "metadata.json")
    for name in names:
        a, b = first.final_dir / name, second.final_dir / name
        assert a.read_bytes() == b.read_bytes(), name
        if name.startswith("layer_"):
            assert a.stat().st_ino == b.stat().st_ino, f"{name} is a copy, not a link"
    meta = metadata(second)
    assert meta["computed"] == [] and set(meta["reused"].values()) == {first.id}
    assert meta["statistics"] == metadata(first)["statistics"] and second.statistics == first.statistics
    assert meta["hook_modules"] == metadata(first)["hook_modules"]
    assert second.notice.startswith("Layers 0, 1 reused") and first.id in second.notice
    # Deleting either keeps the other's files whole.
    before = {name: (second.final_dir / name).read_bytes() for name in names}
    services.delete_extraction(first.id, None)
    assert not first.final_dir.exists()
    assert {name: (second.final_dir / name).read_bytes() for name in names} == before


def test_a_superset_computes_only_the_new_layers_and_stops_after_the_deepest(tiny_model, lines, tmp_path):
    first = extract(tiny_model, lines, layers=[0])
    estimate = html.unescape(services_estimate(tiny_model, lines, layers=["0", "1"]))
    assert "Already on disk: layer 0 reused, 1 computed" in estimate
    second = extract(tiny_model, lines, layers=[0, 1])
    meta = metadata(second)
    assert meta["computed"] == ["layer_1_residual"] and meta["reused"] == {"layer_0_residual": first.id}
    assert (second.final_dir / "layer_0_residual.npy").stat().st_ino == (first.final_dir / "layer_0_residual.npy").stat().st_ino
    # Layer 1 holds what a run of both layers from nothing holds, and so do the figures.
    reference = direct_run(tiny_model, lines, tmp_path, layers=[0, 1])
    for stem in ("layer_0_residual", "layer_1_residual"):
        assert (second.final_dir / f"{stem}.npy").read_bytes() == (reference.output_dir / f"{stem}.npy").read_bytes(), stem
        assert second.statistics[stem] == as_stored(reference.statistics[stem]), stem
    assert (second.final_dir / "tokens.npy").read_bytes() == (reference.output_dir / "tokens.npy").read_bytes()


def services_estimate(model, dataset, **form) -> str:
    from django.test import Client

    client = Client()
    client.force_login(_user())
    data = {"dataset_id": dataset.id, "hook_types": ["residual"], "max_samples": "8", "batch_size": "4", "seq_len": "16", **form}
    response = client.post(f"/models/{model.id}/extract/estimate", data)
    assert response.status_code == 200
    return response.content.decode()


def _user():
    from django.contrib.auth import get_user_model

    return get_user_model().objects.get_or_create(username="estimator")[0]


def test_a_source_of_more_rows_gives_its_first_rows_and_the_figures_are_those_of_the_fewer(tiny_model, lines, tmp_path):
    first = extract(tiny_model, lines, max_samples=12)
    second = extract(tiny_model, lines, max_samples=5)
    assert metadata(second)["reused"] == {"layer_0_residual": first.id}
    reference = direct_run(tiny_model, lines, tmp_path, max_samples=5)
    got = np.load(second.final_dir / "layer_0_residual.npy")
    assert got.shape == (5, 16, 64)
    for name in ("layer_0_residual.npy", "layer_0_residual.norms.npy", "tokens.npy"):
        assert (second.final_dir / name).read_bytes() == (reference.output_dir / name).read_bytes(), name
    assert second.statistics["layer_0_residual"] == as_stored(reference.statistics["layer_0_residual"])
    assert second.statistics != first.statistics  # over 5 rows, not 12
    theirs, ours = np.load(reference.output_dir / "layer_0_residual.stats.npz"), np.load(second.final_dir / "layer_0_residual.stats.npz")
    assert sorted(theirs.files) == sorted(ours.files)
    for key in theirs.files:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_rows_that_differ_are_computed_not_reused(tiny_model, lines):
    first = extract(tiny_model, lines)
    # Other settings that change the rows: never a candidate.
    other = extract(tiny_model, lines, prepend_bos="never")
    assert metadata(other)["reused"] == {} and metadata(other)["computed"] == ["layer_0_residual"]
    # The same settings over rows that are not these (its tokens file says other text): computed.
    tokens = np.load(first.final_dir / "tokens.npy")
    tokens[3, 5] = (tokens[3, 5] + 1) % 100
    (first.final_dir / "tokens.npy").unlink()
    np.save(first.final_dir / "tokens.npy", tokens)
    again = extract(tiny_model, lines)
    assert metadata(again)["reused"] == {} and metadata(again)["computed"] == ["layer_0_residual"]
    assert (again.final_dir / "layer_0_residual.npy").stat().st_ino != (first.final_dir / "layer_0_residual.npy").stat().st_ino


def test_a_source_deleted_while_its_files_are_taken_fails_with_the_reason_and_leaves_nothing(tiny_model, lines, tmp_path):
    from activations_app.ml.reuse import adopt, find_reusable
    from activations_app.ml.tokens import tokenize
    from mistudio.errors import JobError
    from models_app.ml import tokenizer_for

    first = extract(tiny_model, lines)
    spec = first.spec
    tokens = tokenize(lines.texts(), tokenizer_for(tiny_model.weights_dir), spec.seq_len, spec.tokenization, spec.max_samples,
                      spec.prepend_bos, spec.separator)  # fmt: skip
    found = find_reusable([(first.id, first.final_dir)], tokens, ["layer_0_residual"], np.float16, spec.sparsity_threshold)
    assert set(found) == {"layer_0_residual"}
    services.delete_extraction(first.id, None)  # between the job finding it and taking it
    into = tmp_path / "staged"
    into.mkdir()
    with pytest.raises(JobError) as caught:
        adopt(found["layer_0_residual"], into, tokens, tokens.statistics_mask(), spec, ["position_0", "bos", "padding"])
    assert caught.value.code == "reuse_source_gone" and first.id in caught.value.message
    assert list(into.iterdir()) == []
