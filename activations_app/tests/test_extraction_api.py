"""Datasets and extractions through the API, uploads, conflicts, cancel and worker death."""

import html
import io
import json
import subprocess

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command

from activations_app import services
from activations_app.models import Dataset, Extraction
from models_app.tests.support import start_worker, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def upload(client, filename: str, content: bytes, **fields):
    return client.post("/datasets/upload", {"file": SimpleUploadedFile(filename, content), **fields})


@pytest.mark.parametrize(
    "name, content, message",
    [("empty.txt", b"", "is empty"), ("blob.txt", b"\x00\x01\x02binary", "looks binary"),
     ("data.exe", b"text", "Upload a"), ("rows.jsonl", b'{"content": "x"}\n', "has no 'text' field (its fields: 'content')"),
     ("rows.csv", b"body\nhello\n", "has no column 'text'"),
     ("list.jsonl", b'{"text": ["a", "b"]}\n', "line 1: 'text' is list, not text")],
)  # fmt: skip
def test_bad_uploads_are_refused_with_the_reason_and_store_nothing(signed_in, data_dir, name, content, message):
    response = upload(signed_in, name, content)
    assert response.status_code == 400 and message in html.unescape(response.content.decode())
    assert Dataset.objects.count() == 0 and not any((data_dir / "datasets").glob("ds_*"))


def test_an_oversized_upload_is_refused(signed_in, settings):
    settings.DATASET_UPLOAD_LIMIT_BYTES = 10
    response = upload(signed_in, "big.txt", b"one line that is longer than ten bytes\n")
    assert response.status_code == 400 and "the limit is" in response.content.decode()
    assert Dataset.objects.count() == 0


def test_uploads_of_each_format_count_rows_and_preview_them(signed_in):
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = io.BytesIO()
    pq.write_table(pa.table({"body": ["first row", "second row", ""]}), parquet)
    cases = [
        ("lines.txt", b"alpha\nbeta\n\ngamma\n", {}, 2),  # blank-line separated: "alpha\nbeta" and "gamma"
        ("rows.jsonl", b'{"text": "a"}\n{"text": null}\n{"text": ""}\n{"text": "b"}\n', {}, 2),  # null/empty skipped
        ("rows.csv", b"text,label\nhello,1\nworld,2\n", {}, 2),
        ("long.csv", b"text\n" + b"word " * 40_000 + b"\nshort\n", {}, 2),  # a 200 KB field is one document
        ("rows.parquet", parquet.getvalue(), {"text_column": "body"}, 2),
    ]
    for name, content, extra, rows in cases:
        response = upload(signed_in, name, content, name=name, **extra)
        assert (response.status_code, response["Location"]) == (302, "/datasets/"), name  # a reload does not post again
        assert Dataset.objects.get(name=name).row_count == rows, name
    assert Dataset.objects.get(name="lines.txt").preview == ["alpha\nbeta", "gamma"]
    listing = signed_in.get("/api/datasets").json()["data"]
    assert {d["name"] for d in listing} == {name for name, *_ in cases}


def test_the_api_starts_an_extraction_that_a_worker_runs_and_reports(signed_in, tiny_model, data_dir, redis_clean):
    (data_dir / "imports" / "t.txt").write_text("\n".join(f"Row {i} of text about bread." for i in range(30)))
    dataset = services.import_dataset(path=str(data_dir / "imports" / "t.txt"))
    body = {"dataset_id": dataset.id, "layers": [3], "hook_types": ["attention"], "max_samples": 4, "batch_size": 2, "seq_len": 16}
    response = signed_in.post(f"/api/models/{tiny_model.id}/extract", body, content_type="application/json")
    assert response.status_code == 202, response.content
    created = response.json()
    assert signed_in.delete(f"/api/models/{tiny_model.id}").status_code == 409  # an extraction of it is queued
    assert signed_in.delete(f"/api/datasets/{dataset.id}").status_code == 409
    worker = start_worker()
    assert worker.wait(timeout=180) == 0, worker.stdout.read()
    record = signed_in.get(f"/api/extractions/{created['id']}").json()
    assert record["status"] == "completed" and record["samples_processed"] == 4
    assert set(record["statistics"]) == {"layer_3_attention"}
    assert signed_in.get("/api/extractions").json()["pagination"]["total"] == 1
    assert signed_in.delete(f"/api/extractions/{created['id']}").json()["deleted"] is True
    assert not (data_dir / "activations" / f"extraction_{created['id']}").exists()


def long_extraction_running_in_a_worker(model, data_dir):
    """A 200-sample extraction over all 30 layers, queued, with a real worker on it that
    has written its first samples (and resumes nothing by itself: a death is under test)."""
    (data_dir / "imports" / "t.txt").write_text("\n".join(f"Row {i} about the market and the river." for i in range(400)))
    dataset = services.import_dataset(path=str(data_dir / "imports" / "t.txt"))
    extraction = services.request_extraction(model_id=model.id, dataset_id=dataset.id, layers=list(range(30)),
                                             hook_types=["residual"], max_samples=200, batch_size=1, seq_len=64)  # fmt: skip
    worker = start_worker(MISTUDIO_JOB_ATTEMPTS="1")
    wait_for(lambda: Extraction.objects.get(pk=extraction.pk).samples_done >= 2, timeout=120, message="extraction start")
    return extraction, dataset, worker


def test_a_worker_killed_mid_extraction_leaves_the_row_failed_and_no_folder(smollm2_model, data_dir, redis_clean):
    extraction, dataset, worker = long_extraction_running_in_a_worker(smollm2_model, data_dir)
    try:
        subprocess.run(["pkill", "-KILL", "-P", str(worker.pid)], check=True)
        worker.communicate(timeout=60)
    finally:
        worker.kill()
    extraction.refresh_from_db()
    assert extraction.status == "failed" and extraction.error_code == "worker_died"
    assert not any((data_dir / "activations").iterdir())

    # Retrying after the failure works: same model and dataset, a fresh extraction.
    call_command("extract_activations", smollm2_model.id, "--dataset", dataset.id, "--layers", "0", "--hooks", "residual",
                 "--max-samples", "2", "--batch-size", "2", "--seq-len", "16", "--sync")  # fmt: skip
    assert Extraction.objects.filter(status="completed").count() == 1


def test_cancel_stops_the_worker_and_removes_the_temporary_folder(signed_in, smollm2_model, data_dir, redis_clean):
    extraction, _, worker = long_extraction_running_in_a_worker(smollm2_model, data_dir)
    try:
        signed_in.post(f"/extractions/{extraction.id}/cancel")
        worker.communicate(timeout=60)
    finally:
        worker.kill()
    extraction.refresh_from_db()
    assert extraction.status == "cancelled"
    assert not any((data_dir / "activations").iterdir())


async def test_extraction_events_reach_a_connected_client(user, smollm2_model, data_dir):
    from channels.db import database_sync_to_async

    from activations_app.jobs import run_extraction_job
    from models_app.tests.test_consumers import run_in_thread_closing_connection, session_cookie, socket

    (data_dir / "imports" / "t.txt").write_text("\n".join(f"Row {i} about the library." for i in range(20)))
    dataset = await database_sync_to_async(services.import_dataset)(path=str(data_dir / "imports" / "t.txt"))
    extraction = await database_sync_to_async(services.request_extraction)(
        model_id=smollm2_model.id, dataset_id=dataset.id, layers=[1], hook_types=["mlp"], max_samples=4,
        batch_size=1, seq_len=16, enqueue=False,
    )  # fmt: skip
    cookie = await database_sync_to_async(session_cookie)(user)
    events_socket = socket(f"/ws/models/{smollm2_model.id}/extraction", cookie)
    assert (await events_socket.connect())[0]
    assert json.loads(await events_socket.receive_from())["extraction_id"] == extraction.id
    import asyncio

    job = asyncio.create_task(asyncio.to_thread(run_in_thread_closing_connection, run_extraction_job, extraction.id))
    events = []
    while not events or events[-1]["type"] != "extraction_completed":
        events.append(json.loads(await events_socket.receive_from(timeout=60)))
    await job
    progress = [e for e in events if e["type"] == "extraction_progress" and e["status"] == "extracting" and e["samples_processed"]]
    assert progress and progress[-1]["samples_processed"] == 4 and progress[-1]["samples_per_second"] > 0
    import numpy as np

    tokens = np.load(data_dir / "activations" / f"extraction_{extraction.id}" / "tokens.npy")
    counted = int(((np.arange(16) > 0) & (tokens != 1)).sum())  # position 0 and every BOS left out
    assert 4 * 8 < counted < 4 * 16 and events[-1]["statistics"]["layer_1_mlp"]["elements"] == counted * 576
    await events_socket.disconnect()


async def test_a_cancel_reaches_every_connected_client_not_only_the_one_that_asked(user, smollm2_model, data_dir):
    from channels.db import database_sync_to_async

    from models_app.tests.test_consumers import session_cookie, socket

    (data_dir / "imports" / "t.txt").write_text("Row one.\nRow two.\n")
    dataset = await database_sync_to_async(services.import_dataset)(path=str(data_dir / "imports" / "t.txt"))
    extraction = await database_sync_to_async(services.request_extraction)(
        model_id=smollm2_model.id, dataset_id=dataset.id, layers=[1], hook_types=["mlp"], max_samples=2,
        batch_size=1, seq_len=8, enqueue=False,
    )  # fmt: skip
    await database_sync_to_async(Extraction.objects.filter(pk=extraction.pk).update)(status="extracting")
    cookie = await database_sync_to_async(session_cookie)(user)
    other_tab = socket(f"/ws/models/{smollm2_model.id}/extraction", cookie)
    assert (await other_tab.connect())[0]
    assert json.loads(await other_tab.receive_from())["status"] == "extracting"
    await database_sync_to_async(services.cancel_extraction)(extraction.id, None)
    event = json.loads(await other_tab.receive_from(timeout=10))
    assert (event["extraction_id"], event["status"]) == (extraction.id, "cancelled")
    await other_tab.disconnect()


def test_a_hub_dataset_split_is_downloaded_through_the_loopback_hub(hub, tmp_path, capsys):
    from models_app.tests.hub_server import HubRepo, make_sha

    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "train-00000-of-00002.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (repo / "data" / "train-00001-of-00002.jsonl").write_text('{"text": "three"}\n')
    (repo / "data" / "test-00000-of-00001.jsonl").write_text('{"text": "held out"}\n')
    (repo / "README.md").write_text("# corpus")
    hub.add_repo(HubRepo("corpora/tiny", repo, make_sha("corpora/tiny"), repo_type="dataset"))
    call_command("import_dataset", "corpora/tiny", "--download-whole", "--sync", "--json")
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (record["row_count"], record["preview"], record["source"]) == (3, ["one", "two", "three"], "hub")
    call_command("import_dataset", "corpora/tiny", "--sync", "--json")  # streamed: jsonl rows are counted only as read
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (record["row_count"], record["preview"], record["storage"]) == (None, ["one", "two", "three"], "stream")
    assert record["files"] == ["data/train-00000-of-00002.jsonl", "data/train-00001-of-00002.jsonl"]
    call_command("import_dataset", "corpora/tiny", "--split", "test", "--sync", "--json")
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["preview"] == ["held out"]
    with pytest.raises(Exception, match="no 'validation' split"):
        call_command("import_dataset", "corpora/tiny", "--split", "validation", "--sync")
    with pytest.raises(Exception, match="repo_not_found"):
        call_command("import_dataset", "corpora/missing", "--sync")
    assert Dataset.objects.count() == 3


def test_the_api_adds_datasets_by_upload_and_refuses_paths_outside_the_import_roots(signed_in, data_dir):
    response = signed_in.post("/api/datasets", {"file": SimpleUploadedFile("notes.txt", b"first\nsecond\n"), "name": "notes"})
    assert response.status_code == 201 and response.json()["row_count"] == 2
    refused = signed_in.post("/api/datasets", {"path": "/etc/passwd"}, content_type="application/json")
    assert refused.status_code == 400 and "outside the allowed import folders" in refused.json()["error"]["message"]
    assert Dataset.objects.count() == 1


def test_ids_from_the_client_are_looked_up_never_joined_into_paths(signed_in):
    for path in ("/api/extractions/..%2F..%2Fetc", "/api/extractions/ext_000000000000", "/api/datasets/..%2Fsecret"):
        assert signed_in.get(path).status_code == 404


def test_the_dialog_estimate_counts_truncate_rows_from_the_dataset_and_refuses_odd_numbers(signed_in, smollm2_model, data_dir):
    from activations_app.ml.extract import storage_bytes
    from mistudio.templatetags.ui import bytes_short

    (data_dir / "imports" / "t.txt").write_text("\n".join(f"Row {i}." for i in range(30)))
    dataset = services.import_dataset(path=str(data_dir / "imports" / "t.txt"))
    form = {"dataset_id": dataset.id, "layers": ["0", "5"], "hook_types": ["mlp"], "max_samples": "1000",
            "batch_size": "8", "seq_len": "16", "tokenization": "truncate"}  # fmt: skip
    page = html.unescape(signed_in.post(f"/models/{smollm2_model.id}/extract/estimate", form).content.decode())
    # truncate: one row per document, so 30 rows, not the 1,000 asked for
    assert "30 samples" in page and bytes_short(storage_bytes(30, 16, 576, "float16", 2, with_mask=True)) in page
    for field, value, message in [("batch_size", "²", "batch_size must be a whole number"),
                                  ("layers", ["0", "x"], "Layers must be whole numbers"),
                                  ("layers", ["", "1"], "Layers must be whole numbers")]:  # fmt: skip
        response = signed_in.post(f"/models/{smollm2_model.id}/extract/estimate", {**form, field: value})
        assert response.status_code == 200 and message in html.unescape(response.content.decode()), field
    assert Extraction.objects.count() == 0


def test_ctrl_c_in_a_sync_extraction_leaves_the_row_failed_not_extracting(smollm2_model, data_dir):
    from activations_app.jobs import run_extraction_job

    (data_dir / "imports" / "t.txt").write_text("\n".join(f"Row {i} about the market." for i in range(20)))
    dataset = services.import_dataset(path=str(data_dir / "imports" / "t.txt"))
    extraction = services.request_extraction(model_id=smollm2_model.id, dataset_id=dataset.id, layers=[0],
                                             hook_types=["mlp"], max_samples=4, batch_size=1, seq_len=16, enqueue=False)  # fmt: skip

    def interrupt_once_extracting(row):  # the terminal bar's callback, where a Ctrl-C lands as well as anywhere
        if row.status == "extracting":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_extraction_job(extraction.id, listener=interrupt_once_extracting)
    extraction.refresh_from_db()
    assert (extraction.status, extraction.error_code) == ("failed", "interrupted")
    assert not (data_dir / "activations").exists() or not any((data_dir / "activations").iterdir())


def test_a_whole_worker_killed_mid_extraction_is_found_by_rq_maintenance(smollm2_model, data_dir, redis_clean, settings):
    """SIGKILL to the worker and its work horse together (a container kill): no process is
    left to record anything. RQ's registry maintenance, in any worker, finds the job's
    heartbeat lapsed and our handler ends the row failed and removes its partial folder."""
    import time

    import django_rq
    from rq.registry import StartedJobRegistry

    from mistudio.worker import MistudioWorker, abandoned_job_handler

    settings.JOB_ATTEMPTS = 1  # the failure is under test, not the automatic resume
    queue = django_rq.get_queue("default")
    assert abandoned_job_handler in MistudioWorker([queue], connection=queue.connection)._exc_handlers
    extraction, _, worker = long_extraction_running_in_a_worker(smollm2_model, data_dir)
    horses = subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True, text=True).stdout.split()
    assert horses
    worker.kill()
    subprocess.run(["kill", "-KILL", *horses], check=True)
    worker.communicate(timeout=60)
    extraction.refresh_from_db()
    assert extraction.status == "extracting"  # nobody was left to say otherwise
    assert any((data_dir / "activations").iterdir())  # the partial folder

    # The maintenance pass as it runs once the heartbeat (90 s) has lapsed; the timestamp
    # stands in for the wait.
    StartedJobRegistry(queue=queue).cleanup(timestamp=time.time() + 3600, exception_handlers=[abandoned_job_handler])
    extraction.refresh_from_db()
    assert (extraction.status, extraction.error_code) == ("failed", "worker_died")
    assert not any((data_dir / "activations").iterdir())


def test_extraction_templates_save_load_favourite_and_delete_through_api_command_and_dialog(signed_in, smollm2_model, user, capsys):
    from django.core.management import call_command

    from activations_app.models import ExtractionTemplate

    body = {"name": "late residuals", "layers": [29, 20, 40], "hook_types": ["residual"], "seq_len": 64}
    refused = signed_in.post(f"/api/models/{smollm2_model.id}/extraction-templates", body, content_type="application/json")
    assert refused.status_code == 400 and refused.json()["error"]["details"] == {"field": "layers"}  # 40 > 29: validated
    assert not ExtractionTemplate.objects.exists()
    body["layers"] = [29, 20]
    saved = signed_in.post(f"/api/models/{smollm2_model.id}/extraction-templates", body, content_type="application/json")
    assert saved.status_code == 201
    template = saved.json()
    assert (template["layers"], template["hook_types"], template["seq_len"], template["favourite"]) == ([20, 29], ["residual"], 64, False)
    nameless = signed_in.post(f"/api/models/{smollm2_model.id}/extraction-templates", {**body, "name": "\u0000"},
                              content_type="application/json")  # fmt: skip
    assert nameless.status_code == 400 and nameless.json()["error"]["details"] == {"field": "name"}
    # The same name again replaces it: one template.
    again = signed_in.post(f"/api/models/{smollm2_model.id}/extraction-templates", {**body, "seq_len": 128}, content_type="application/json")
    assert again.json()["id"] == template["id"] and again.json()["seq_len"] == 128 and ExtractionTemplate.objects.count() == 1
    # The command saves one as the operator; favourites come first in the list.
    call_command("extract_activations", smollm2_model.id, "--layers", "0,1", "--hooks", "mlp", "--save-template", "early mlp",
                 "--user", user.username)  # fmt: skip
    starred = signed_in.post(f"/api/extraction-templates/{template['id']}/favourite", {"favourite": True}, content_type="application/json")
    assert starred.json()["favourite"] is True
    listed = [t["name"] for t in signed_in.get("/api/extraction-templates").json()["data"]]
    assert listed == ["late residuals", "early mlp"]
    capsys.readouterr()
    call_command("extraction_templates", "--user", user.username)
    assert capsys.readouterr().out.splitlines()[0].startswith(f"★ {template['id']}  late residuals  layers 20,29  residual")
    # The dialog loads it: its layers and hooks checked, its settings filled in.
    dialog = signed_in.get(f"/models/{smollm2_model.id}/extract", {"template": template["id"]}).content.decode()
    assert "Loaded “late residuals”." in dialog
    assert 'value="20" class="sr-only" checked' in dialog and 'value="29" class="sr-only" checked' in dialog
    assert 'value="0" class="sr-only" checked' not in dialog and 'name="seq_len" value="128"' in dialog
    # A template is its owner's: another user neither sees nor deletes it.
    from django.contrib.auth import get_user_model
    from django.test import Client

    other = Client()
    other.force_login(get_user_model().objects.create_user("other", password="x"))
    assert other.get("/api/extraction-templates").json()["data"] == []
    assert other.delete(f"/api/extraction-templates/{template['id']}").status_code == 404
    assert signed_in.delete(f"/api/extraction-templates/{template['id']}").json()["deleted"] is True
    assert [t.name for t in ExtractionTemplate.objects.all()] == ["early mlp"]
