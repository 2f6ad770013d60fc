"""Workers on other machines: each reports its device and memory budget with its
heartbeat; a request is judged against the live workers' budgets and goes to the queue of
the device class that can hold it, and is refused, naming every worker, when none can."""

import json
import shutil
import signal

import pytest
from rq.job import Job

from mistudio import capacity
from mistudio.errors import ServiceError
from models_app import services
from models_app.models import Model, ModelStatus
from models_app.tests.support import start_worker, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

SMALL_BUDGET = 100_000  # holds the tiny llama in no format (its Q2 alone is ~0.5 MB)
BIG_BUDGET = 200_000_000


@pytest.fixture
def two_workers(redis_clean):
    """A 'small' and a 'big' worker class, as a CPU host and a GPU host would be: two real
    RQ workers with their own budgets (MISTUDIO_GPU_MEMORY_LIMIT) and queues."""
    small = start_worker(burst=False, MISTUDIO_WORKER_CLASS="small", MISTUDIO_GPU_MEMORY_LIMIT=str(SMALL_BUDGET))
    big = start_worker(burst=False, MISTUDIO_WORKER_CLASS="big", MISTUDIO_GPU_MEMORY_LIMIT=str(BIG_BUDGET))
    try:
        wait_for(lambda: {w.queue for w in capacity.live_workers(redis_clean)} == {"small", "big"}, timeout=90,
                 message="both workers report their capacity")  # fmt: skip
        yield {w.queue: w for w in capacity.live_workers(redis_clean)}
    finally:
        for process in (small, big):
            process.send_signal(signal.SIGTERM)  # a warm shutdown withdraws its capacity record
        for process in (small, big):
            process.wait(timeout=60)
    assert capacity.live_workers(redis_clean) == []


def huge_config_folder(folder):
    """A folder whose config.json describes a 70B-class llama, refused from its config before
    its weights are read (an empty shard stands in for them)."""
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
    }))  # fmt: skip
    return folder


def test_a_model_too_large_for_one_worker_runs_on_the_other_and_is_refused_when_neither_fits(
    two_workers, data_dir, tiny_repo_folder, user, client
):
    small, big = two_workers["small"], two_workers["big"]
    assert (small.budget_bytes, big.budget_bytes) == (SMALL_BUDGET, BIG_BUDGET)
    assert small.device == big.device == "cpu" and small.host == big.host

    # /healthz shows staff each worker's device and budget.
    client.force_login(user)
    assert client.get("/healthz").json() == {"status": "ok"}  # not to others
    user.is_staff = True
    user.save(update_fields=["is_staff"])
    health = client.get("/healthz").json()
    assert {w["name"]: w["budget_bytes"] for w in health["workers"]} == {small.worker: SMALL_BUDGET, big.worker: BIG_BUDGET}

    folder = data_dir / "imports" / "tiny"
    shutil.copytree(tiny_repo_folder, folder)
    model = services.request_import(user=user, path=str(folder))
    wait_for(lambda: Model.objects.get(pk=model.pk).status in (ModelStatus.READY, ModelStatus.ERROR), timeout=120,
             message="the import finishes")  # fmt: skip
    model.refresh_from_db()
    assert model.status == ModelStatus.READY, model.error_message
    job = Job.fetch(model.job_id, connection=two_workers_connection())
    assert (job.origin, job.worker_name) == ("big", big.worker)

    huge = huge_config_folder(data_dir / "imports" / "huge")
    with pytest.raises(ServiceError) as refused:
        services.request_import(user=user, path=str(huge))
    assert refused.value.code == "does_not_fit"
    message = refused.value.message
    assert small.worker in message and big.worker in message, message
    assert "100.0 KB budget" in message and "200.0 MB budget" in message, message
    assert Model.objects.count() == 1  # the refusal made no row


def test_the_estimate_names_the_worker_it_counted_on(two_workers, hub, user, client):
    client.force_login(user)
    response = client.post("/api/models/estimate", {"repo_id": "tiny/llama"}, content_type="application/json")
    assert response.status_code == 200, response.content
    placement = response.json()["placement"]["FP32"]
    assert placement["fits"] and placement["queue"] == "big"
    assert two_workers["big"].worker in placement["note"]


def test_a_job_on_a_worker_that_cannot_hold_the_model_is_refused_there_before_it_loads(
    two_workers, data_dir, tiny_repo_folder
):
    """A job that reached the wrong worker (its class changed, a stale report) checks its own
    machine first: the small worker refuses to load what its budget cannot hold."""
    folder = data_dir / "imports" / "tiny"
    shutil.copytree(tiny_repo_folder, folder)
    model = services.request_import(user=None, path=str(folder), enqueue=False)
    from mistudio import jobs

    jobs.enqueue_after_commit(model, "small")
    wait_for(lambda: Model.objects.get(pk=model.pk).status in (ModelStatus.READY, ModelStatus.ERROR), timeout=120,
             message="the job ends")  # fmt: skip
    model.refresh_from_db()
    assert model.status == ModelStatus.ERROR and model.error_code == "does_not_fit", model.error_message
    assert "100.0 KB" in model.error_message, model.error_message


def two_workers_connection():
    from mistudio.queue import queue

    return queue().connection
