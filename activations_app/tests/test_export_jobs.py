"""Exports are tracked jobs (issue 17, item 2): a record with its status and progress, one
at a time per extraction and format (409 for the second), a free-space check before a byte
is written, cancel and retry, nothing left behind by a dead worker, --json on the command,
and a card on the extraction's page."""

import json
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from activations_app import jobs, services
from activations_app.models import Export, ExportStatus, Extraction, ExtractionStatus
from mistudio import jobs as tracked
from models_app.tests.support import run_burst_worker

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def finished(tiny_model, data_dir, user):
    path = data_dir / "imports" / "lines.txt"
    path.write_text("\n".join(f"Sentence number {i} about rivers and bridges." for i in range(60)))
    dataset = services.import_dataset(path=str(path), user=user)
    extraction = services.request_extraction(model_id=tiny_model.id, dataset_id=dataset.id, enqueue=False, user=user,
                                             layers=[0, 2], hook_types=["residual", "mlp"], max_samples=24, batch_size=8, seq_len=16)  # fmt: skip
    jobs.run_extraction_job(extraction.id)
    extraction = Extraction.objects.get(pk=extraction.id)
    assert extraction.status == ExtractionStatus.COMPLETED, extraction.error_message
    return extraction


def test_an_export_from_the_api_is_tracked_one_at_a_time_and_shown_on_its_page(finished, signed_in, redis_clean):
    path = f"/api/extractions/{finished.id}/export"
    first = signed_in.post(path, {"format": "saelens"}, content_type="application/json")
    assert first.status_code == 202, first.content
    export = first.json()
    assert export["status"] == "queued" and export["path"] == str(finished.final_dir / "saelens")
    second = signed_in.post(path, {"format": "saelens"}, content_type="application/json")
    assert second.status_code == 409 and second.json()["error"]["code"] == "export_running"
    assert export["id"] in second.json()["error"]["message"] and Export.objects.count() == 1
    page = signed_in.get(f"/extractions/{finished.id}").content.decode()
    assert f'id="export-card-{export["id"]}"' in page and "Cancel export" in page
    assert ">Export for SAELens<" not in page  # no second start while one runs

    assert run_burst_worker().returncode == 0
    done = signed_in.get(f"/api/exports/{export['id']}").json()
    assert done["status"] == "completed" and done["progress"] == 100.0
    assert done["rows_done"] == done["rows_total"] == finished.samples_total * 4  # every row of every layer/hook
    assert sorted(p.rsplit("/", 1)[1] for p in done["datasets"]) == [  # the model's module paths (hf), by default
        "model.layers.0", "model.layers.0.mlp", "model.layers.2", "model.layers.2.mlp"]
    page = signed_in.get(f"/extractions/{finished.id}").content.decode()
    assert "Written to" in page and str(finished.final_dir / "saelens") in page and "Export for SAELens again" in page
    assert "LanguageModelSAERunnerConfig(" in page and 'data-copy="#saelens-snippet-' in page  # the settings, with a copy button
    assert signed_in.post(path, content_type="application/json").status_code == 202  # the next one may start now


def test_too_little_free_space_is_refused_before_anything_is_made(finished, signed_in, settings, tmp_path):
    settings.DISK_RESERVE_BYTES = 10**18  # more than any disk: as good as a full one
    response = signed_in.post(f"/api/extractions/{finished.id}/export", content_type="application/json")
    assert response.status_code == 400 and response.json()["error"]["code"] == "insufficient_disk_space"
    assert "GB" in response.json()["error"]["message"]
    with pytest.raises(CommandError, match=r"\[insufficient_disk_space\]"):
        call_command("export_activations", finished.id, "--out", str(tmp_path / "new" / "out"))
    assert not Export.objects.exists() and not (tmp_path / "new").exists() and not (finished.final_dir / "saelens").exists()


def test_cancel_and_retry_through_the_api_and_the_page(finished, signed_in, redis_clean, django_user_model):
    from django.test import Client

    # Someone else's export of this user's extraction: its owner may stop it (it blocks their delete).
    other = django_user_model.objects.create_user("another-researcher", password="another-password-1")
    export = services.export_extraction(finished.id, other)
    cancelled = signed_in.post(f"/api/exports/{export.id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    # A retry while another export of the same extraction and format runs is refused like a new one.
    running = services.export_extraction(finished.id, None)
    stranger = Client()
    stranger.force_login(other)
    refused = stranger.post(f"/api/exports/{export.id}/retry")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "export_running"
    services.cancel_export(running.id, None)
    page = signed_in.get(f"/extractions/{finished.id}").content.decode()
    assert f'action="/exports/{export.id}/retry"' in page
    retried = signed_in.post(f"/exports/{export.id}/retry")
    assert retried.status_code == 302 and Export.objects.get(pk=export.id).status == ExportStatus.QUEUED
    assert run_burst_worker().returncode == 0
    assert Export.objects.get(pk=export.id).status == ExportStatus.COMPLETED


def test_a_dead_worker_leaves_no_partial_export_and_the_export_resumes_by_itself(finished, settings, redis_clean):
    for attempts, expected in ((1, ExportStatus.FAILED), (3, ExportStatus.QUEUED)):
        settings.JOB_ATTEMPTS = attempts
        export = services.export_extraction(finished.id, None, enqueue=False)
        Export.objects.filter(pk=export.id).update(status=ExportStatus.EXPORTING, job_id=f"job-{attempts}")
        export.staging_dir.mkdir(parents=True)
        (export.staging_dir / "data-00000-of-00001.arrow").write_bytes(b"\0" * 4096)  # what kill -9 left
        tracked.mark_worker_died(f"job-{attempts}", "signal 9")
        after = Export.objects.get(pk=export.id)
        assert after.status == expected, (attempts, after.status)
        assert not export.staging_dir.exists()  # no .partial left, whichever way it went
        if expected == ExportStatus.FAILED:
            assert after.error_code == "worker_died"
        else:
            assert after.notice == "Resumed automatically after its worker stopped (attempt 2 of 3)."
            tracked.cancel(Export, export.id, None)


def test_the_command_prints_the_record_as_json_and_can_queue(finished, tmp_path, capsys, redis_clean):
    call_command("export_activations", finished.id, "--out", str(tmp_path / "out"), "--json")
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["status"] == "completed" and record["path"] == str(tmp_path / "out") and len(record["datasets"]) == 4
    call_command("export_activations", finished.id, "--queue", "--json")
    queued = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert queued["status"] == "queued" and Export.objects.get(pk=queued["id"]).job_id


def test_export_json_holds_what_saelens_needs_and_the_tokens_are_a_dataset_beside_the_activations(finished, tmp_path, capsys):
    import datasets
    import numpy as np

    call_command("export_activations", finished.id, "--out", str(tmp_path / "out"))
    said = capsys.readouterr()
    record = json.loads((tmp_path / "out" / "export.json").read_text())
    metadata = json.loads((finished.final_dir / "metadata.json").read_text())
    tokens = np.load(finished.final_dir / "tokens.npy")
    assert record["d_in"] == 64 and record["context_size"] == 16 and record["dtype"] == "float16"
    assert record["dataset"]["id"] == finished.dataset_id and record["tokenization"]["mode"] == "packed"
    assert record["tokenization"]["separator"] == "bos" and record["normalization"]["left_out"] == metadata["statistics_exclude"]
    assert record["row_order"]["shuffled"] is False and not (tmp_path / "out" / "row_order.npy").exists()
    assert record["naming"] == "hf" and "AutoModelForCausalLM" in said.err  # the command says which naming, and why
    assert record["hooks"] == ["model.layers.0", "model.layers.0.mlp", "model.layers.2", "model.layers.2.mlp"]
    assert record["transformerlens_names"]["model.layers.2.mlp"] == "blocks.2.hook_mlp_out"
    for name, settings in record["saelens"].items():
        # The hook's own folder (the export's root is what SAELens cannot load), loadable as is.
        loaded = datasets.load_from_disk(settings["cached_activations_path"])
        assert loaded.column_names == [name, "token_ids"] and loaded.features[name].shape == (16, 64)
        tl = record["transformerlens_names"][name]
        stem = f"layer_{tl.split('.')[1]}_{'residual' if tl.endswith('resid_post') else 'mlp'}"
        assert settings["norm_scaling_factor"] == metadata["statistics"][stem]["norm_scaling_factor"]
        assert settings["hook_name"] == name and settings["d_in"] == 64
        assert tmp_path / "out" / settings["dataset_path"] == Path(record["tokens_dataset"])  # relative to the export
    # Opened as SAELens opens dataset_path: load_dataset(path, split="train").
    windows = datasets.load_dataset(record["tokens_dataset"], split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert windows.column_names == ["tokens"] and np.array_equal(np.array(windows["tokens"]), tokens)
    # Each hook's `runner` and `sae` are keyword arguments SAELens' configs take as they are.
    first = record["saelens"][record["hooks"][0]]
    assert first["runner"]["model_class_name"] == "AutoModelForCausalLM" and first["sae"]["d_in"] == 64
    assert first["runner"]["exclude_special_tokens"] == metadata["excluded_token_ids"] == [1]
    assert first["runner"]["sequence_separator_token"] == "bos" and first["runner"]["prepend_bos"] is True
    assert "LanguageModelSAERunnerConfig(" in said.err and "cached_activations_path=" in said.err
    assert said.out.strip().splitlines()[-1].endswith("model.layers.2.mlp")  # stdout: the paths, as before
    call_command("export_activations", finished.id, "--out", str(tmp_path / "tl"), "--naming", "tl")
    tl = json.loads((tmp_path / "tl" / "export.json").read_text())
    assert tl["naming"] == "tl" and tl["hooks"] == ["blocks.0.hook_resid_post", "blocks.0.hook_mlp_out", "blocks.2.hook_resid_post",
                                                     "blocks.2.hook_mlp_out"]
    assert datasets.load_from_disk(tl["saelens"]["blocks.2.hook_mlp_out"]["cached_activations_path"]).column_names[0] == "blocks.2.hook_mlp_out"


def test_a_shuffled_export_permutes_every_hook_and_the_tokens_alike_by_its_seed(finished, tmp_path, capsys, signed_in, redis_clean):
    """`--shuffle SEED`: the rows of every hook's dataset and of the tokens dataset are the
    extraction's rows in numpy's permutation for that seed (row_order.npy says which), so
    activations and their tokens still line up; the same seed gives the same order."""
    import datasets
    import numpy as np

    call_command("export_activations", finished.id, "--out", str(tmp_path / "a"), "--shuffle", "7", "--json")
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["shuffle_seed"] == 7
    record = json.loads((tmp_path / "a" / "export.json").read_text())
    order = np.load(tmp_path / "a" / "row_order.npy")
    n = 24
    assert order.tolist() == np.random.default_rng(7).permutation(n).tolist() and order.tolist() != list(range(n))
    assert record["row_order"]["shuffled"] and record["row_order"]["seed"] == 7
    tokens = np.load(finished.final_dir / "tokens.npy")
    windows = datasets.load_dataset(record["tokens_dataset"], split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert np.array_equal(np.array(windows["tokens"]), tokens[order])
    for name, settings in record["saelens"].items():
        loaded = datasets.load_from_disk(settings["cached_activations_path"]).with_format("numpy")
        tl = record["transformerlens_names"][name]
        stem = f"layer_{tl.split('.')[1]}_{'residual' if tl.endswith('resid_post') else 'mlp'}"
        values = np.load(finished.final_dir / f"{stem}.npy")
        assert np.array_equal(loaded[name], values[order]) and np.array_equal(loaded["token_ids"], tokens[order])
    call_command("export_activations", finished.id, "--out", str(tmp_path / "b"), "--shuffle", "7")
    assert np.array_equal(np.load(tmp_path / "b" / "row_order.npy"), order)
    # A seed that is not a whole number from 0 to 2^32 - 1 is refused before anything is written.
    for bad in (-1, 2**32, "seven", 1.5, True):
        answer = signed_in.post(f"/api/extractions/{finished.id}/export", {"shuffle": bad}, content_type="application/json")
        assert answer.status_code == 400 and answer.json()["error"]["details"]["field"] == "shuffle", (bad, answer.content)
    with pytest.raises(CommandError, match="shuffle seed"):
        call_command("export_activations", finished.id, "--out", str(tmp_path / "c"), "--shuffle", "-3")
    assert not (tmp_path / "c").exists() and Export.objects.count() == 2


def test_the_default_naming_is_the_one_the_models_saelens_path_hooks(finished, tmp_path, capsys):
    """TransformerLens names for a model TransformerLens loads by name (SAELens' default
    HookedTransformer path); module paths for every other, SmolLM2 (a Llama) included."""
    from activations_app.ml.export import default_naming
    from models_app.models import Model

    assert default_naming("HuggingFaceTB/SmolLM2-135M")[0] == "hf" and default_naming(None)[0] == "hf"
    assert default_naming("EleutherAI/pythia-70m")[0] == "tl" and default_naming("gpt2")[0] == "tl"
    Model.objects.filter(pk=finished.model_id).update(repo_id="EleutherAI/pythia-70m")
    metadata_file = finished.final_dir / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    metadata_file.write_text(json.dumps({**metadata, "model": {**metadata["model"], "repo_id": "EleutherAI/pythia-70m"}}))
    call_command("export_activations", finished.id, "--out", str(tmp_path / "out"))
    said = capsys.readouterr()
    record = json.loads((tmp_path / "out" / "export.json").read_text())
    assert record["naming"] == "tl" and record["hooks"][0] == "blocks.0.hook_resid_post"
    assert "TransformerLens loads by name" in said.err and record["naming_reason"].startswith("tl: EleutherAI/pythia-70m")
