"""One job lifecycle for every kind of row: a refused enqueue, a cancel and a dead worker
end a model, an extraction and a dataset import the same way. Hub dataset imports are
jobs like model downloads: queued → downloading → ready, live, cancellable, staged."""

import json
import subprocess
import time

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.core.management import call_command

from activations_app import services
from activations_app.ml.extract import ExtractionSpec
from activations_app.models import Dataset, Extraction
from mistudio import jobs
from mistudio.staging import staged_path
from models_app import services as model_services
from models_app.models import Model
from models_app.tests.hub_server import HubRepo, make_sha
from models_app.tests.support import free_port, start_worker, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

NOT_STARTED = "The job queue (Redis) was not reachable; the job was not started."


@pytest.fixture
def refusing_redis():
    """A real Redis that answers PING but refuses every write (maxmemory of one byte, no
    eviction): the queue looks up when the request checks it, then refuses the job."""
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--maxmemory", "1", "--maxmemory-policy", "noeviction"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout.strip() == b"PONG",
                 timeout=20, message="the refusing Redis")  # fmt: skip
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def text_dataset(data_dir):
    (data_dir / "imports" / "t.txt").write_text("".join(f"The river runs past mill number {i}.\n" for i in range(40)))
    return services.import_dataset(path=str(data_dir / "imports" / "t.txt"))


def corpus_repo(hub, tmp_path, repo_id="corpora/lines", rows=2000):
    repo = tmp_path / "corpus"
    (repo / "data").mkdir(parents=True)
    lines = "".join(json.dumps({"text": f"line {i} of a corpus with some words in it"}) + "\n" for i in range(rows))
    (repo / "data" / "train-00000-of-00001.jsonl").write_text(lines)
    hub.add_repo(HubRepo(repo_id, repo, make_sha(repo_id), repo_type="dataset"))
    return repo_id


def test_a_refused_enqueue_fails_an_extraction_row_exactly_as_it_fails_a_model_row(
    settings, refusing_redis, smollm2_model, text_dataset, hub, tmp_path, django_capture_on_commit_callbacks
):
    dataset_repo = corpus_repo(hub, tmp_path, rows=10)
    settings.RQ_QUEUES = {"default": {"URL": refusing_redis, "DEFAULT_TIMEOUT": 60}}
    with django_capture_on_commit_callbacks(execute=True):
        model = model_services.request_download(user=None, repo_id="tiny/llama", quantization="FP32")
        extraction = services.request_extraction(model_id=smollm2_model.id, dataset_id=text_dataset.id, layers=[0],
                                                 hook_types=["residual"], max_samples=2, batch_size=1, seq_len=8)  # fmt: skip
        dataset = services.import_dataset(path=dataset_repo, download_whole=True)
    outcomes = []
    for row in (model, extraction, dataset):
        row.refresh_from_db()
        outcomes.append((row.status, row.error_code, row.error_message, row.is_running))
    assert outcomes == [
        ("error", "queue_unavailable", NOT_STARTED, False),
        ("failed", "queue_unavailable", NOT_STARTED, False),
        ("error", "queue_unavailable", NOT_STARTED, False),
    ]
    assert model.encrypted_token is None and dataset.encrypted_token is None


def test_a_dead_worker_fails_every_kind_of_row_the_same_way_and_removes_its_files(smollm2_model, text_dataset, data_dir, settings):
    settings.JOB_ATTEMPTS = 1  # no automatic resume (test_auto_resume.py has those)
    model = Model.objects.create(name="m", status="downloading", job_id="job-1")
    extraction = Extraction.objects.create(model=smollm2_model, dataset=text_dataset, status="extracting", job_id="job-1",
                                           **ExtractionSpec(layers=[0], hook_types=["mlp"]).request())  # fmt: skip
    dataset = Dataset.objects.create(name="d", source="hub", file_path="", status="downloading", job_id="job-1")
    bystander = Extraction.objects.create(model=smollm2_model, dataset=text_dataset, status="extracting", job_id="job-2",
                                          **ExtractionSpec(layers=[0], hook_types=["mlp"]).request())  # fmt: skip
    for folder in (model.raw_dir, staged_path(extraction.final_dir), staged_path(dataset.folder)):
        folder.mkdir(parents=True)
        (folder / "part.bin").write_bytes(b"half")
    jobs.mark_worker_died("job-1", "signal 9")
    ended = []
    for row in (model, extraction, dataset):
        row.refresh_from_db()
        ended.append((row.status, row.error_code, row.error_message))
    message = "The worker process stopped unexpectedly (signal 9); retry."
    assert ended == [("error", "worker_died", message), ("failed", "worker_died", message), ("error", "worker_died", message)]
    assert not model.raw_dir.exists() and not staged_path(extraction.final_dir).exists()
    # A download's partial bytes stay aside for a retry to resume (a cancel removes them).
    assert (staged_path(dataset.folder) / "part.bin").read_bytes() == b"half"
    bystander.refresh_from_db()
    assert bystander.status == "extracting"


def test_cancel_answers_the_same_for_every_kind(signed_in, smollm2_model, text_dataset, django_capture_on_commit_callbacks):
    model = Model.objects.create(name="m", status="queued")
    extraction = Extraction.objects.create(model=smollm2_model, dataset=text_dataset, status="queued",
                                           **ExtractionSpec(layers=[0], hook_types=["mlp"]).request())  # fmt: skip
    dataset = Dataset.objects.create(name="d", source="hub", file_path="", status="queued")
    for path in (f"/api/models/{model.id}/cancel", f"/api/extractions/{extraction.id}/cancel",
                 f"/api/datasets/{dataset.id}/cancel"):  # fmt: skip
        first = signed_in.post(path)
        assert first.status_code == 200 and first.json()["status"] == "cancelled", first.content
        again = signed_in.post(path)
        assert again.status_code == 409 and again.json()["error"]["code"] == "not_running"
    for path in ("/api/models/m_000000000000/cancel", "/api/extractions/ext_000000000000/cancel",
                 "/api/datasets/ds_000000000000/cancel"):  # fmt: skip
        assert signed_in.post(path).status_code == 404


def test_a_hub_dataset_is_imported_by_a_worker_through_queued_downloading_and_ready(signed_in, hub, tmp_path, data_dir):
    repo_id = corpus_repo(hub, tmp_path)
    response = signed_in.post("/api/datasets", {"repo_id": repo_id, "download_whole": True}, content_type="application/json")
    assert response.status_code == 202, response.content
    created = response.json()
    assert created["status"] == "queued" and created["bytes_total"] > 0
    assert not Dataset.objects.get(pk=created["id"]).folder.exists()
    worker = start_worker()
    output, _ = worker.communicate(timeout=120)
    dataset = Dataset.objects.get(pk=created["id"])
    assert dataset.status == "ready", output
    assert (dataset.row_count, dataset.preview[0]) == (2000, "line 0 of a corpus with some words in it")
    assert dataset.bytes_done == dataset.bytes_total and dataset.progress == 100.0
    assert dataset.revision == make_sha(repo_id)
    assert not staged_path(dataset.folder).exists()
    page = signed_in.get("/datasets/").content.decode()
    assert f'id="dataset-{dataset.id}"' in page and "2,000</span> rows" in page


def test_a_wrong_split_or_repo_is_refused_before_any_row_exists(signed_in, hub, tmp_path):
    repo_id = corpus_repo(hub, tmp_path)
    response = signed_in.post("/api/datasets", {"repo_id": repo_id, "split": "validation"}, content_type="application/json")
    assert response.status_code == 400 and response.json()["error"]["code"] == "split_not_found"
    page = signed_in.post("/datasets/import", {"repo_id": "corpora/missing", "split": "train"})
    assert page.status_code == 400 and "was not found on the Hub" in page.content.decode()
    assert Dataset.objects.count() == 0


def test_a_hub_dataset_that_does_not_fit_on_disk_is_refused_before_its_files_move(hub, tmp_path, settings, data_dir):
    repo_id = corpus_repo(hub, tmp_path)
    settings.DISK_RESERVE_BYTES = 10**15
    with pytest.raises(Exception, match="insufficient_disk_space"):
        call_command("import_dataset", repo_id, "--download-whole", "--sync")
    dataset = Dataset.objects.get()
    assert (dataset.status, dataset.error_code) == ("error", "insufficient_disk_space")
    # Nothing fetched but the request's look at the first rows (is the text column there?): one
    # 64 KB block and the read in flight past it.
    fetched = [r for r in hub.requests if "/resolve/" in r.path and r.method == "GET"]
    assert all(r.range and r.body_bytes <= 128 << 10 for r in fetched) and len(fetched) <= 1, fetched
    assert not dataset.folder.exists() and not staged_path(dataset.folder).exists()


def test_cancelling_a_hub_dataset_import_stops_the_worker_and_removes_its_files(signed_in, hub, tmp_path, data_dir):
    repo_id = corpus_repo(hub, tmp_path, rows=40_000)  # about 2 MB
    hub.bytes_per_second = 200_000
    created = signed_in.post("/api/datasets", {"repo_id": repo_id, "download_whole": True}, content_type="application/json").json()
    worker = start_worker()
    try:
        wait_for(lambda: Dataset.objects.get(pk=created["id"]).bytes_done > 100_000, timeout=60, message="bytes on disk")
        assert signed_in.post(f"/datasets/{created['id']}/cancel").status_code == 302
        worker.communicate(timeout=30)
    finally:
        worker.kill()
    dataset = Dataset.objects.get(pk=created["id"])
    assert dataset.status == "cancelled"
    time.sleep(0.5)  # nothing is written after the cancel: the work horse is gone
    assert not dataset.folder.exists() and not staged_path(dataset.folder).exists()
    assert "Cancelled; partial files were removed." in signed_in.get("/datasets/").content.decode()


async def test_the_datasets_page_socket_shows_an_import_live(user, hub, tmp_path, data_dir):
    from activations_app.jobs import run_dataset_import
    from mistudio.asgi import application

    repo_id = await database_sync_to_async(corpus_repo)(hub, tmp_path)
    dataset = await database_sync_to_async(services.import_dataset)(path=repo_id, enqueue=False, download_whole=True)
    page = WebsocketCommunicator(application, "/ws/datasets/", headers=[(b"origin", b"http://localhost")])
    page.scope["user"] = user
    connected, _ = await page.connect()
    assert connected
    first = await page.receive_from(timeout=10)
    assert f'id="dataset-{dataset.id}"' in first and 'data-status="queued"' in first
    await database_sync_to_async(run_dataset_import)(dataset.id)
    statuses = []
    while "ready" not in statuses:
        fragment = await page.receive_from(timeout=20)
        if f'id="dataset-{dataset.id}"' in fragment:
            statuses.append(fragment.split('data-status="', 1)[1].split('"', 1)[0])
    assert statuses[0] == "downloading" and statuses[-1] == "ready"
    await page.disconnect()


def test_the_dialog_the_api_and_the_command_share_one_validation_and_one_set_of_defaults(
    signed_in, smollm2_model, text_dataset, capsys
):
    dialog = signed_in.get(f"/models/{smollm2_model.id}/extract").content.decode()
    for name in ("batch_size", "max_samples", "seq_len"):
        assert f'name="{name}" value="{ExtractionSpec.default(name)}"' in dialog
    body = {"dataset_id": text_dataset.id, "layers": [2, 0], "hook_types": ["mlp", "residual"]}
    from_api = signed_in.post(f"/api/models/{smollm2_model.id}/extract", body, content_type="application/json").json()
    call_command("extract_activations", smollm2_model.id, "--dataset", text_dataset.id, "--layers", "2,0",
                 "--hooks", "mlp,residual", "--json")  # fmt: skip
    from_command = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    posted = signed_in.post(f"/models/{smollm2_model.id}/extract/start",
                            {"dataset_id": text_dataset.id, "layers": ["2", "0"], "hook_types": ["mlp", "residual"]})  # fmt: skip
    from_dialog = Extraction.objects.order_by("-created_at").first()
    assert posted.status_code == 200 and f'ws-connect="/ws/extractions/?extraction={from_dialog.id}"' in posted.content.decode()
    expected = ExtractionSpec(layers=[0, 2], hook_types=["residual", "mlp"]).request()
    assert {k: from_api[k] for k in expected} == expected
    assert {k: from_command[k] for k in expected} == expected
    assert from_dialog.spec.request() == expected
    bad = signed_in.post(f"/api/models/{smollm2_model.id}/extract", {**body, "batch_size": "１"}, content_type="application/json")
    assert bad.status_code == 400 and bad.json()["error"] == {
        "code": "invalid_input", "message": "batch_size must be a whole number.", "details": {"field": "batch_size"},
        "retryable": False,
    }  # fmt: skip
