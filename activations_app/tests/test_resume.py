"""Research-grade extraction on the real SmolLM2: BOS control, per-dimension statistics
checked against numpy over the whole file, and a run killed part way that resumes from its
last durable batch and ends byte-identical to an uninterrupted one."""

import json
import subprocess

import numpy as np
import pytest
from django.core.management import call_command

from activations_app import jobs, services
from activations_app.ml.stats import NORM_BIN_EDGES
from activations_app.models import Extraction, ExtractionStatus
from models_app.tests.support import start_worker, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

TEXT = "\n".join(f"Line {i}: the river runs through the old city, past the bakery, the market and the bridge."
                 for i in range(900))  # fmt: skip


@pytest.fixture
def dataset(data_dir, capsys):
    path = data_dir / "imports" / "river.txt"
    path.write_text(TEXT)
    call_command("import_dataset", str(path), "--json")
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture
def long_dataset(data_dir, capsys):
    """Enough text for 1,600 windows of 48 tokens: a run of SmolLM2's tiny sibling that lasts
    long enough (a few seconds) to be stopped part way."""
    path = data_dir / "imports" / "long-river.txt"
    path.write_text("\n".join([TEXT] * 8))
    call_command("import_dataset", str(path), "--json")
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def output_files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".npy", ".npz")}


@pytest.mark.parametrize("prepend_bos", ["always", "never"])
def test_statistics_match_numpy_over_the_kept_positions_and_position_0_is_always_left_out(smollm2_model, dataset, data_dir, prepend_bos):
    """The new defaults (BOS first, BOS between packed documents): the statistics and the norm
    factor are numpy's over exactly the kept positions, which never include position 0 (BOS,
    or with no BOS the attention sink) nor any BOS; without a BOS first, position 0 is an
    ordinary token and is still left out."""
    extraction = services.request_extraction(
        model_id=smollm2_model.id, dataset_id=dataset["id"], enqueue=False,
        layers=[0, 3], hook_types=["residual", "mlp"], max_samples=12, batch_size=5, seq_len=24, dtype="float32",
        **({} if prepend_bos == "always" else {"prepend_bos": prepend_bos}),  # "always" is the default now
    )  # fmt: skip
    assert (extraction.prepend_bos, extraction.separator) == (prepend_bos, "bos")
    jobs.run_extraction_job(extraction.id)
    extraction.refresh_from_db()
    assert extraction.status == ExtractionStatus.COMPLETED, extraction.error_message
    out = data_dir / "activations" / f"extraction_{extraction.id}"
    tokens = np.load(out / "tokens.npy")
    metadata = json.loads((out / "metadata.json").read_text())
    bos = 1  # SmolLM2's <|im_start|>
    assert metadata["statistics_exclude"] == ["position_0", "bos", "padding"] and metadata["excluded_token_ids"] == [bos]
    assert metadata["separator"] == "bos" and (tokens[:, 1:] == bos).any()  # documents joined by BOS, as SAELens packs
    assert not (tokens == 2).any()  # and not by EOS
    if prepend_bos == "always":
        assert metadata["bos_token_id"] == bos and (tokens[:, 0] == bos).all()
    else:
        assert metadata["bos_token_id"] is None and (tokens[:, 0] != bos).any()
    kept = np.ones(tokens.shape, dtype=bool)
    kept[:, 0] = False
    kept &= tokens != bos
    assert kept.sum() < 12 * 23  # some BOS separators inside the rows were left out too
    assert metadata["hook_modules"]["layer_3_mlp"] == "model.layers.3.mlp"
    for stem in ("layer_0_residual", "layer_0_mlp", "layer_3_residual", "layer_3_mlp"):
        every = np.load(out / f"{stem}.npy").astype(np.float64)
        values = every[kept]
        saved = np.load(out / f"{stem}.stats.npz")
        assert int(saved["count"]) == len(values) == kept.sum()
        np.testing.assert_allclose(saved["mean"], values.mean(axis=0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(saved["var"], values.var(axis=0), rtol=1e-8, atol=1e-12)
        figures = metadata["statistics"][stem]
        norms = np.linalg.norm(values, axis=1)
        assert figures["norm_scaling_factor"] == pytest.approx(np.sqrt(576) / norms.mean(), rel=1e-9)
        histogram = figures["norm_histogram"]
        counts = np.histogram(norms, bins=NORM_BIN_EDGES)[0]
        assert histogram["counts"] == counts.tolist() and histogram["below"] + histogram["above"] + counts.sum() == len(norms)
        assert figures["tokens"] == kept.sum()
        if stem == "layer_3_residual":
            # Position 0 is the attention sink with or without a BOS there: far above the rest
            # (about 8x the median already at layer 3 of SmolLM2; more in deeper layers).
            first = np.linalg.norm(every[:, 0], axis=1)
            assert first.min() > 5 * np.median(norms), (first.min(), np.median(norms))
            # Counted, it would lower the norm factor a trainer normalises by.
            with_first = np.linalg.norm(every[~(tokens == bos) | (np.arange(24) == 0)], axis=1)
            assert np.sqrt(576) / with_first.mean() < 0.95 * figures["norm_scaling_factor"]


@pytest.mark.parametrize(("mode", "first_is_bos"), [("always", True), ("never", False), ("auto", False)])
def test_prepend_bos_modes_on_packed_windows(smollm2_folder, mode, first_is_bos):
    """SmolLM2's tokenizer adds no BOS of its own, so `auto` puts none; `always` starts every
    window with BOS followed by seq_len - 1 text tokens."""
    from transformers import AutoTokenizer

    from activations_app.ml.tokens import tokenize

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    texts = TEXT.splitlines()[:40]
    tokens = tokenize(texts, tokenizer, seq_len=16, mode="packed", max_samples=10, prepend_bos=mode)
    assert tokens.ids.shape == (10, 16)
    bos = tokenizer.bos_token_id
    assert bool((tokens.ids[:, 0] == bos).all()) is first_is_bos
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    body = 15 if first_is_bos else 16
    assert tokens.ids[:, 16 - body :].reshape(-1).tolist() == stream[: 10 * body]


@pytest.mark.parametrize("separator", ["bos", "eos"])
def test_packed_documents_are_joined_by_the_chosen_separator(smollm2_folder, separator):
    """BOS between documents by default (SAELens' packing); EOS on request (as before)."""
    from transformers import AutoTokenizer

    from activations_app.ml.tokens import tokenize

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    texts = TEXT.splitlines()[:40]
    tokens = tokenize(texts, tokenizer, seq_len=16, mode="packed", max_samples=10, prepend_bos="always", separator=separator)
    joint = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}[separator]
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [joint]
    assert tokens.ids[:, 1:].reshape(-1).tolist() == stream[: 10 * 15]
    kept = tokens.statistics_mask()
    assert not kept[:, 0].any() and not kept[tokens.ids == tokenizer.bos_token_id].any()
    assert kept[tokens.ids == tokenizer.eos_token_id].all()  # EOS is a real token to the statistics


def test_a_worker_killed_part_way_resumes_by_itself_and_ends_byte_identical_to_a_clean_run(tiny_model, long_dataset, data_dir, signed_in):
    # The code path, not the weights, is under test: SmolLM2's family at a tiny size.
    request = dict(layers=[1, 3], hook_types=["residual", "attention"], max_samples=800, batch_size=8, seq_len=48)
    extraction = services.request_extraction(model_id=tiny_model.id, dataset_id=long_dataset["id"], **request)
    worker = start_worker(burst=False, MISTUDIO_CHECKPOINT_SECONDS="0", MISTUDIO_JOB_RETRY_BACKOFF="0.5")
    try:
        wait_for(lambda: Extraction.objects.get(pk=extraction.id).samples_done >= 200, timeout=180, message="part way")
        subprocess.run(["pkill", "-KILL", "-P", str(worker.pid)], check=True)  # the work horse, as the OOM killer would
        # Nobody presses Resume: the worker queues it again by itself, from its checkpoint.
        wait_for(lambda: Extraction.objects.get(pk=extraction.id).attempt == 2, timeout=60, message="resumed by itself")
        stopped = Extraction.objects.get(pk=extraction.id)
        assert stopped.notice == "Resumed automatically after its worker stopped (attempt 2 of 3).", stopped.notice
        assert stopped.status != ExtractionStatus.FAILED and stopped.error_code == ""
        kept = stopped.resumable_rows
        # Durable lags the progress shown by the batch in flight on the background thread.
        assert 24 <= kept < 800 and kept % 8 == 0, kept
        assert not stopped.final_dir.exists()  # nothing where the finished files go
        assert "attempt 2 of 3" in signed_in.get(f"/extractions/{extraction.id}").content.decode()
        wait_for(lambda: Extraction.objects.get(pk=extraction.id).status in (ExtractionStatus.COMPLETED, ExtractionStatus.FAILED),
                 timeout=240, message="the resumed run ends")  # fmt: skip
    finally:
        worker.terminate()
        worker.communicate(timeout=60)
    resumed = Extraction.objects.get(pk=extraction.id)
    assert resumed.status == ExtractionStatus.COMPLETED, resumed.error_message
    assert resumed.notice.startswith("Resumed automatically") and resumed.attempt == 2  # its checkpoint was trusted

    # An uninterrupted run, computed (the resumed run is deleted first: it would be reused).
    first, figures = output_files(resumed.final_dir), resumed.statistics
    services.delete_extraction(resumed.id, None)
    clean = services.request_extraction(model_id=tiny_model.id, dataset_id=long_dataset["id"], enqueue=False, **request)
    jobs.run_extraction_job(clean.id)
    clean.refresh_from_db()
    assert clean.status == ExtractionStatus.COMPLETED and json.loads((clean.final_dir / "metadata.json").read_text())["reused"] == {}
    second = output_files(clean.final_dir)
    assert sorted(first) == sorted(second) and "layer_3_attention.stats.npz" in first
    for name in first:
        assert first[name] == second[name], f"{name} differs from an uninterrupted run"
    assert figures == clean.statistics
    assert "checkpoint.npz" not in first


def test_a_cancel_that_keeps_its_files_can_be_resumed_and_one_that_does_not_cannot(tiny_model, long_dataset, signed_in):
    request = dict(layers=[3], hook_types=["residual"], max_samples=800, batch_size=8, seq_len=48)
    extraction = services.request_extraction(model_id=tiny_model.id, dataset_id=long_dataset["id"], **request)
    worker = start_worker(burst=False, MISTUDIO_CHECKPOINT_SECONDS="0")
    try:
        wait_for(lambda: Extraction.objects.get(pk=extraction.id).samples_done >= 200, timeout=180, message="part way")
        response = signed_in.post(f"/api/extractions/{extraction.id}/cancel", {"keep": True}, content_type="application/json")
        assert response.status_code == 200 and response.json()["status"] == "cancelled"
        assert Extraction.objects.get(pk=extraction.id).resumable_rows >= 12  # durable lags by the batch in flight
        assert signed_in.post(f"/api/extractions/{extraction.id}/resume").status_code == 202
        wait_for(lambda: Extraction.objects.get(pk=extraction.id).status == ExtractionStatus.COMPLETED, timeout=240,
                 message="the resumed run ends")  # fmt: skip

        services.delete_extraction(extraction.id, None)  # else the same request would reuse its files, not run
        other = services.request_extraction(model_id=tiny_model.id, dataset_id=long_dataset["id"], **request)
        wait_for(lambda: Extraction.objects.get(pk=other.id).samples_done >= 200, timeout=180, message="part way")
        assert signed_in.post(f"/api/extractions/{other.id}/cancel").status_code == 200
        refused = signed_in.post(f"/api/extractions/{other.id}/resume")
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "not_resumable"
    finally:
        worker.terminate()
        worker.communicate(timeout=60)


def test_the_page_offers_resume_only_where_a_checkpoint_was_kept(smollm2_model, dataset, signed_in, redis_clean):
    from mistudio.staging import staged_path

    extraction = services.request_extraction(model_id=smollm2_model.id, dataset_id=dataset["id"], enqueue=False,
                                             layers=[0], hook_types=["residual"], max_samples=8)  # fmt: skip
    Extraction.objects.filter(pk=extraction.id).update(status=ExtractionStatus.FAILED, error_code="worker_died",
                                                       error_message="its worker stopped while running it")  # fmt: skip
    page = signed_in.get(f"/extractions/{extraction.id}").content.decode()
    assert "Retry from the start" in page and "Resume from sample" not in page
    staged = staged_path(extraction.final_dir)
    staged.mkdir(parents=True)
    np.savez(staged / "checkpoint.npz", __rows__=np.int64(4), __fingerprint__=np.str_("x"))
    page = signed_in.get(f"/extractions/{extraction.id}").content.decode()
    assert "Resume from sample 4" in page
    response = signed_in.post(f"/extractions/{extraction.id}/resume")
    assert response.status_code == 302
    resumed = Extraction.objects.get(pk=extraction.id)
    assert resumed.status == ExtractionStatus.QUEUED and staged.is_dir()  # the checkpoint stays for the job


def test_the_saelens_export_loads_with_datasets_and_holds_the_npy_values(smollm2_model, dataset, data_dir, capsys):
    import datasets

    extraction = services.request_extraction(model_id=smollm2_model.id, dataset_id=dataset["id"], enqueue=False,
                                             layers=[1, 4], hook_types=["residual", "mlp", "attention"],
                                             max_samples=70, batch_size=8, seq_len=16)  # fmt: skip
    jobs.run_extraction_job(extraction.id)
    extraction.refresh_from_db()
    call_command("export_activations", extraction.id, "--format", "saelens", "--naming", "tl")
    out = extraction.final_dir / "saelens"
    printed = capsys.readouterr()
    assert "100.0%" in printed.err and str(out / "blocks.4.hook_attn_out") in printed.out
    tokens = np.load(extraction.final_dir / "tokens.npy")
    for layer in (1, 4):
        for hook, name in (("residual", "hook_resid_post"), ("mlp", "hook_mlp_out"), ("attention", "hook_attn_out")):
            column = f"blocks.{layer}.{name}"
            loaded = datasets.load_from_disk(str(out / column))
            assert loaded.column_names == [column, "token_ids"] and len(loaded) == 70
            assert loaded.features[column].shape == (16, 576)  # what ActivationsStore checks: (context_size, d_in)
            loaded.set_format("numpy")
            np.testing.assert_array_equal(loaded[column], np.load(extraction.final_dir / f"layer_{layer}_{hook}.npy"))
            np.testing.assert_array_equal(loaded["token_ids"], tokens)
    assert Extraction.objects.get(pk=extraction.id).as_dict()["exports"] == {"saelens": str(out)}
    assert not list(extraction.final_dir.glob(".saelens*"))  # nothing staged left behind


def test_a_refused_page_action_says_why_on_the_page(smollm2_model, dataset, signed_in):
    extraction = services.request_extraction(model_id=smollm2_model.id, dataset_id=dataset["id"], enqueue=False,
                                             layers=[0], hook_types=["residual"], max_samples=8)  # fmt: skip
    Extraction.objects.filter(pk=extraction.id).update(status=ExtractionStatus.FAILED, error_code="worker_died")
    response = signed_in.post(f"/extractions/{extraction.id}/resume")  # no checkpoint was kept
    assert response.status_code == 409
    assert "kept no checkpoint to resume from" in response.content.decode()
    response = signed_in.post(f"/extractions/{extraction.id}/export")
    assert response.status_code == 409 and "only a completed extraction can be exported" in response.content.decode()


def test_every_page_has_its_own_title(smollm2_model, dataset, signed_in):
    extraction = services.request_extraction(model_id=smollm2_model.id, dataset_id=dataset["id"], enqueue=False,
                                             layers=[0], hook_types=["residual"], max_samples=8)  # fmt: skip
    titles = {
        "/": "Models · MechInterp Studio", "/datasets/": "Datasets · MechInterp Studio",
        "/extractions/": "Extractions · MechInterp Studio",
        f"/extractions/{extraction.id}": f"{extraction.id} (queued) · Extractions · MechInterp Studio",
    }  # fmt: skip
    for path, title in titles.items():
        page = signed_in.get(path)
        assert page.status_code == 200 and f"<title>{title}</title>" in page.content.decode(), path


def test_the_estimate_counts_the_rows_the_dataset_really_yields(smollm2_model, data_dir, capsys):
    """A million samples of a small dataset: the estimate gives the rows its tokens make,
    exactly what the run then produces (it said 12,243 h for a 217-row dataset before)."""
    from activations_app.ml.extract import ExtractionSpec

    path = data_dir / "imports" / "small.txt"
    path.write_text("\n".join(f"Row {i}: a short line of text about the river and the town." for i in range(217)))
    call_command("import_dataset", str(path), "--json")
    dataset_id = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["id"]
    from activations_app.models import Dataset

    dataset = Dataset.objects.get(pk=dataset_id)
    for mode in ("packed", "truncate"):
        spec = ExtractionSpec(layers=[0], hook_types=["residual"], max_samples=1_000_000, seq_len=32, tokenization=mode)
        estimate = services.estimate_extraction(smollm2_model, spec, dataset)
        assert estimate["samples_at_most"] is False and estimate["samples"] < 1000, (mode, estimate["samples"])
        assert estimate["time_seconds"] < 3600 and not estimate["warnings"], estimate["warnings"]
        extraction = services.request_extraction(model_id=smollm2_model.id, dataset_id=dataset.id, enqueue=False,
                                                 layers=[0], hook_types=["residual"], max_samples=1_000_000, seq_len=32,
                                                 tokenization=mode, batch_size=64)  # fmt: skip
        jobs.run_extraction_job(extraction.id)
        extraction.refresh_from_db()
        assert extraction.status == ExtractionStatus.COMPLETED, extraction.error_message
        assert extraction.samples_total == estimate["samples"], mode  # what was estimated is what ran


def stopped_with_checkpoint(model_id, dataset_id, code="worker_died"):
    from mistudio.staging import staged_path

    extraction = services.request_extraction(model_id=model_id, dataset_id=dataset_id, enqueue=False,
                                             layers=[0], hook_types=["residual"], max_samples=8)  # fmt: skip
    Extraction.objects.filter(pk=extraction.id).update(status=ExtractionStatus.FAILED, error_code=code)
    staged = staged_path(extraction.final_dir)
    staged.mkdir(parents=True)
    np.savez(staged / "checkpoint.npz", __rows__=np.int64(4), __fingerprint__=np.str_("x"))
    return extraction, staged


def test_retry_and_resume_refuse_with_409_and_keep_the_checkpoint_when_the_model_or_dataset_is_gone(tiny_model, dataset, signed_in, redis_clean):
    from activations_app.models import Dataset
    from models_app.models import Model

    extraction, staged = stopped_with_checkpoint(tiny_model.id, dataset["id"])
    Dataset.objects.filter(pk=dataset["id"]).delete()
    for action in ("resume", "retry"):
        response = signed_in.post(f"/api/extractions/{extraction.id}/{action}")
        assert response.status_code == 409 and response.json()["error"]["code"] == "inputs_missing", response.content
        assert "its dataset was deleted" in response.json()["error"]["message"]
        assert (staged / "checkpoint.npz").is_file()  # nothing of it was changed
    Model.objects.filter(pk=tiny_model.id).delete()
    page = signed_in.post(f"/extractions/{extraction.id}/retry")
    assert page.status_code == 409 and "its model and its dataset were deleted" in page.content.decode()
    assert Extraction.objects.get(pk=extraction.id).status == ExtractionStatus.FAILED and (staged / "checkpoint.npz").is_file()


def test_the_admins_retry_starts_over_like_the_page_and_its_resume_goes_on(tiny_model, dataset, client, django_user_model, redis_clean):
    """One retry and one resume: the admin's Retry of a timed-out run drops the checkpoint
    (it used to resume), exactly as the page's and the API's do."""
    staff = django_user_model.objects.create_superuser("staff", password="pw-for-admin-tests")
    client.force_login(staff)
    extraction, staged = stopped_with_checkpoint(tiny_model.id, dataset["id"], code="timeout")
    response = client.post("/admin/activations_app/extraction/", {"action": "retry_selected", "_selected_action": [extraction.id]})
    assert response.status_code == 302
    assert Extraction.objects.get(pk=extraction.id).status == ExtractionStatus.QUEUED
    assert not staged.exists()  # started over, as Retry says


def stop_inline_run_keeping(extraction_id, until):
    """Run the extraction here (on a thread, as a worker's job would) and, once `until(row)`,
    stop it with Stop (keep for Resume): the cancel is seen by the job itself, before anything
    stops its process. The row as it ended."""
    import threading

    from django.db import connection

    def run():
        try:
            jobs.run_extraction_job(extraction_id)
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: until(Extraction.objects.get(pk=extraction_id)), timeout=120, message="part way")
    services.cancel_extraction(extraction_id, None, keep=True)
    thread.join(timeout=60)
    return Extraction.objects.get(pk=extraction_id)


def test_a_stop_that_keeps_its_files_keeps_them_when_the_job_sees_the_cancel_first(tiny_model, long_dataset, settings):
    """Stop (keep for Resume) on a run that notices the cancel itself before anything stops
    its process (an inline run here; a worker's job can too, between the row's flip and the
    stop command): it used to remove the checkpoint it was asked to keep."""
    settings.EXTRACTION_CHECKPOINT_SECONDS = 0.0
    extraction = services.request_extraction(model_id=tiny_model.id, dataset_id=long_dataset["id"], enqueue=False,
                                             layers=[3], hook_types=["residual"], max_samples=1600, batch_size=8, seq_len=48)  # fmt: skip
    stopped = stop_inline_run_keeping(extraction.id, lambda row: row.samples_done >= 200)
    assert stopped.status == ExtractionStatus.CANCELLED and stopped.as_dict()["error_code"] == "stopped_kept"
    assert stopped.resumable_rows >= 8, "the checkpoint the user asked to keep is gone"
