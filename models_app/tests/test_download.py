"""Downloads end to end: the API or a command queues a job, a real RQ worker (a
subprocess, burst mode) runs it against the loopback Hub, PostgreSQL holds the outcome."""

import json
import threading

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from conftest import GATED_TOKEN
from models_app import services
from models_app.models import Model, ModelStatus
from models_app.tests.hub_server import VALID_UNGATED_TOKEN, make_sha
from models_app.tests.support import SMOLLM2_PARAMS, run_burst_worker, start_worker, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def api_download(client, **body):
    response = client.post("/api/models/download", body, content_type="application/json")
    assert response.status_code == 202, response.content
    return response.json()


def test_a_download_from_the_api_ends_ready_with_files_and_exact_figures(signed_in, hub, data_dir, tiny_repo_folder):
    created = api_download(signed_in, repo_id="tiny/llama", quantization="FP32")
    assert created["status"] == "queued"

    worker = run_burst_worker()
    assert worker.returncode == 0, worker.stdout + worker.stderr

    model = Model.objects.get(pk=created["id"])
    assert model.status == ModelStatus.READY, model.error_message
    assert model.architecture == "llama"
    from transformers import AutoModelForCausalLM

    assert model.params_count == AutoModelForCausalLM.from_pretrained(tiny_repo_folder).num_parameters()
    assert model.memory_required_bytes == round(model.params_count * 4 * 1.2)
    raw = data_dir / "models" / "raw" / model.id
    assert sorted(p.name for p in raw.iterdir()) == ["SHA256SUMS", "config.json", "generation_config.json", "model.safetensors"]
    # Each file's SHA-256, in sha256sum's own format: `sha256sum -c SHA256SUMS` re-checks the snapshot by hand.
    import hashlib

    listed = dict(reversed(line.split("  ")) for line in (raw / "SHA256SUMS").read_text().splitlines())
    assert listed == {name: hashlib.sha256((tiny_repo_folder / name).read_bytes()).hexdigest()
                      for name in ("config.json", "generation_config.json", "model.safetensors")}  # fmt: skip
    assert model.disk_size_bytes == sum(p.stat().st_size for p in raw.iterdir())
    assert model.bytes_done == model.bytes_total == model.disk_size_bytes - (raw / "SHA256SUMS").stat().st_size
    assert model.progress == 100.0
    assert model.architecture_config["hidden_size"] == 64
    assert model.revision == make_sha("tiny/llama")  # the resolved commit, not "main"
    detail = signed_in.get(f"/api/models/{model.id}").json()
    assert detail["status"] == "ready" and detail["architecture_config"]["num_hidden_layers"] == 2


def test_smollm2_downloads_with_its_real_parameter_count(hub_with_smollm2, data_dir, capsys):
    call_command("download_model", "HuggingFaceTB/SmolLM2-135M", "--sync", "--json")
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["status"] == "ready"
    assert record["params_count"] == SMOLLM2_PARAMS
    assert record["architecture"] == "llama"
    assert record["quantization"] == "FP32"
    assert record["memory_required_bytes"] == round(SMOLLM2_PARAMS * 4 * 1.2)
    assert record["architecture_config"]["num_hidden_layers"] == 30
    raw = data_dir / "models" / "raw" / record["id"]
    assert (raw / "model.safetensors").stat().st_size > 500_000_000
    assert (raw / "tokenizer.json").is_file()


def test_fp16_is_written_as_safetensors_at_half_the_size(signed_in, hub, data_dir):
    created = api_download(signed_in, repo_id="tiny/llama", quantization="FP16")
    run_burst_worker()
    model = Model.objects.get(pk=created["id"])
    assert model.status == ModelStatus.READY, model.error_message
    fp16 = data_dir / "models" / "quantized" / f"{model.id}_FP16"
    assert model.quantized_path == str(fp16)
    import torch
    from safetensors import safe_open

    with safe_open(str(fp16 / "model.safetensors"), framework="pt") as handle:
        dtypes = {handle.get_tensor(name).dtype for name in handle.keys()}
    assert dtypes == {torch.float16}
    raw_weights = (data_dir / "models" / "raw" / model.id / "model.safetensors").stat().st_size
    assert (fp16 / "model.safetensors").stat().st_size == pytest.approx(raw_weights / 2, rel=0.01)
    assert model.memory_required_bytes == round(model.params_count * 2 * 1.2)
    assert model.disk_size_bytes == sum(p.stat().st_size for p in fp16.iterdir())


def test_a_gated_repo_without_a_token_fails_asking_for_one_and_sends_no_token(signed_in, hub, data_dir):
    created = api_download(signed_in, repo_id="tiny/gated", quantization="FP32")
    # The worker's own token must never be sent on behalf of a user who gave none.
    run_burst_worker(HF_TOKEN="hf_worker_own_token")
    model = Model.objects.get(pk=created["id"])
    assert model.status == ModelStatus.ERROR
    assert model.error_code == "gated_token_required"
    assert "add an access token" in model.error_message
    assert hub.requests and all(r.authorization is None for r in hub.requests)
    assert not (data_dir / "models" / "raw" / model.id).exists()


def test_a_gated_repo_with_a_granted_token_downloads_and_the_token_is_erased(signed_in, hub):
    created = api_download(signed_in, repo_id="tiny/gated", quantization="FP32", access_token=GATED_TOKEN)
    assert GATED_TOKEN not in json.dumps(created)
    assert Model.objects.get(pk=created["id"]).encrypted_token is not None
    worker = run_burst_worker()
    model = Model.objects.get(pk=created["id"])
    assert model.status == ModelStatus.READY, model.error_message
    assert model.encrypted_token is None
    assert any(r.authorization == f"Bearer {GATED_TOKEN}" for r in hub.requests)
    assert GATED_TOKEN not in worker.stdout + worker.stderr


@pytest.mark.parametrize(
    "token, code, phrase",
    [(VALID_UNGATED_TOKEN, "gated_access_denied", "not been granted"), ("hf_wrong", "invalid_token", "rejected the access token")],
)
def test_a_gated_repo_with_a_token_that_cannot_read_it_says_which_problem(signed_in, hub, token, code, phrase):
    created = api_download(signed_in, repo_id="tiny/gated", quantization="FP32", access_token=token)
    worker = run_burst_worker()
    model = Model.objects.get(pk=created["id"])
    assert (model.status, model.error_code) == (ModelStatus.ERROR, code)
    assert phrase in model.error_message
    assert token not in model.error_message
    assert token not in worker.stdout + worker.stderr
    assert model.encrypted_token is None


@pytest.mark.parametrize(
    "repo_id, revision, code",
    [("nobody/nothing", None, "repo_not_found"), ("tiny/llama", "no-such-branch", "revision_not_found"),
     ("google/bert-tiny", None, "unsupported_architecture")],
)  # fmt: skip
def test_errors_a_user_can_act_on_have_their_own_code_and_message(hub, data_dir, capsys, repo_id, revision, code):
    args = [repo_id, "--sync"] + (["--revision", revision] if revision else [])
    with pytest.raises(CommandError) as caught:
        call_command("download_model", *args)
    model = Model.objects.get()
    assert model.status == ModelStatus.ERROR and model.error_code == code
    assert f"[{code}]" in str(caught.value) and model.error_message in str(caught.value)
    assert not (data_dir / "models" / "raw" / model.id).exists()


def test_the_encoder_only_refusal_comes_before_the_weights_are_fetched(hub):
    with pytest.raises(CommandError, match="encoder-only"):
        call_command("download_model", "google/bert-tiny", "--sync")
    assert not [r for r in hub.requests if r.path.endswith("model.safetensors") and r.method == "GET"]


def test_a_network_failure_is_retried_with_backoff(hub, settings):
    hub.fail_next_requests = 2
    call_command("download_model", "tiny/llama", "--sync")
    assert Model.objects.get().status == ModelStatus.READY


def test_a_network_failure_that_persists_fails_with_a_network_error(hub, settings):
    settings.HUB_RETRIES = 2
    hub.fail_next_requests = 1000
    with pytest.raises(CommandError, match="network_error"):
        call_command("download_model", "tiny/llama", "--sync")
    hub.fail_next_requests = 0
    assert Model.objects.get().error_code == "network_error"


def test_a_download_that_does_not_fit_on_disk_is_refused_with_the_figures(hub, settings, data_dir):
    settings.DISK_RESERVE_BYTES = 10**15  # keep a petabyte free: nothing fits
    with pytest.raises(CommandError) as caught:
        call_command("download_model", "tiny/llama", "--sync")
    message = str(caught.value)
    assert "[insufficient_disk_space]" in message and "needs" in message and "available" in message
    assert not [r for r in hub.requests if r.path.endswith("model.safetensors") and r.method == "GET"]
    assert not (data_dir / "models" / "raw" / Model.objects.get().id).exists()


def test_cancel_stops_the_worker_process_and_removes_partial_files(signed_in, hub, data_dir):
    hub.bytes_per_second = 200_000  # the ~1.4 MB tiny model takes ~7 s
    created = api_download(signed_in, repo_id="tiny/llama", quantization="FP32")
    worker = start_worker()
    try:
        wait_for(
            lambda: Model.objects.get(pk=created["id"]).bytes_done > 100_000, timeout=60, message="bytes on disk"
        )
        response = signed_in.post(f"/api/models/{created['id']}/cancel")
        assert response.status_code == 200 and response.json()["status"] == "cancelled"
        output, _ = worker.communicate(timeout=30)
    finally:
        worker.kill()
    assert "stopped by user" in output.lower() or "stopped" in output.lower()
    model = Model.objects.get(pk=created["id"])
    assert model.status == ModelStatus.CANCELLED
    assert not (data_dir / "models" / "raw" / model.id).exists()
    # nothing written after the cancel: the worker process is gone
    assert not any((data_dir / "models").rglob("*.incomplete"))


def test_a_running_model_cannot_be_deleted_and_a_finished_one_is_deleted_with_its_files(signed_in, hub, data_dir):
    created = api_download(signed_in, repo_id="tiny/llama", quantization="FP16")
    assert signed_in.delete(f"/api/models/{created['id']}").status_code == 409
    run_burst_worker()
    model = Model.objects.get(pk=created["id"])
    assert model.raw_dir.exists() and model.quantized_dir("FP16").exists()
    assert signed_in.delete(f"/api/models/{model.id}").json() == {"deleted": True, "id": model.id}
    assert not model.raw_dir.exists() and not model.quantized_dir("FP16").exists()
    assert not Model.objects.filter(pk=model.id).exists()
    again = signed_in.delete(f"/api/models/{model.id}")
    assert again.status_code == 200 and again.json()["deleted"] is False


def test_an_inline_job_stops_when_its_row_is_cancelled_elsewhere(hub, data_dir):
    hub.bytes_per_second = 200_000
    model = services.request_download(user=None, repo_id="tiny/llama", quantization="FP32", enqueue=False)
    outcome = {}

    def run():
        from django.db import connection

        from models_app.jobs import run_download

        try:
            outcome["model"] = run_download(model.id)
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: Model.objects.get(pk=model.id).bytes_done > 0, timeout=30, message="download start")
    services.cancel_model(model.id, None)
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert Model.objects.get(pk=model.id).status == ModelStatus.CANCELLED
    assert not model.raw_dir.exists()


def test_a_worker_killed_mid_download_leaves_the_row_failed_not_running(signed_in, hub, data_dir):
    import signal
    import subprocess

    hub.bytes_per_second = 200_000
    created = api_download(signed_in, repo_id="tiny/llama", quantization="FP32")
    worker = start_worker(MISTUDIO_JOB_ATTEMPTS="1")  # no automatic resume: the failure is under test
    try:
        wait_for(lambda: Model.objects.get(pk=created["id"]).bytes_done > 0, timeout=60, message="download start")
        # The work horse is the worker's child process; SIGKILL it as the OOM killer would.
        subprocess.run(["pkill", "-KILL", "-P", str(worker.pid)], check=True)
        output, _ = worker.communicate(timeout=60)
    finally:
        worker.kill()
    model = Model.objects.get(pk=created["id"])
    assert model.status == ModelStatus.ERROR, output
    assert model.error_code == "worker_died" and f"signal {int(signal.SIGKILL)}" in model.error_message
    assert not (data_dir / "models" / "raw" / model.id).exists()


def test_a_retry_after_the_worker_died_at_half_way_fetches_only_the_rest(signed_in, hub, data_dir, tiny_repo_folder):
    import subprocess

    from mistudio.staging import staged_path

    weights = (tiny_repo_folder / "model.safetensors").stat().st_size
    hub.bytes_per_second = 450_000  # the ~1.4 MB weights take ~3 s: half way in ~1.5 s
    created = api_download(signed_in, repo_id="tiny/llama", quantization="FP32")
    worker = start_worker(MISTUDIO_JOB_ATTEMPTS="1")  # no automatic resume: the failure is under test
    try:
        wait_for(lambda: Model.objects.get(pk=created["id"]).bytes_done > weights // 2, timeout=60, message="half way")
        subprocess.run(["pkill", "-KILL", "-P", str(worker.pid)], check=True)
        worker.communicate(timeout=60)
    finally:
        worker.kill()
    model = Model.objects.get(pk=created["id"])
    assert (model.status, model.error_code) == ("error", "worker_died")
    assert not model.raw_dir.exists()  # nothing where the finished snapshot goes
    partial = sum(p.stat().st_size for p in staged_path(model.raw_dir).rglob("*.incomplete"))
    assert partial > weights * 0.4, partial  # the bytes already fetched are kept aside

    hub.clear_log()
    hub.bytes_per_second = None
    retried = signed_in.post(f"/api/models/{model.id}/retry", {}, content_type="application/json")
    assert retried.status_code == 202 and retried.json()["status"] == "queued"
    run_burst_worker()
    model.refresh_from_db()
    assert model.status == ModelStatus.READY, model.error_message
    fetches = [r for r in hub.requests if r.method == "GET" and r.path.endswith("/model.safetensors")]
    assert fetches and all(r.range for r in fetches), fetches
    start = int(fetches[0].range.removeprefix("bytes=").split("-")[0])
    print(f"weights {weights:,} B; kept at the worker's death {partial:,} B; the retry asked for bytes {start:,}- "
          f"({weights - start:,} B, {100 * (weights - start) / weights:.0f} % of the file)")
    assert start >= partial - (1 << 20) and start > weights * 0.4, (start, partial, weights)
    assert (model.raw_dir / "model.safetensors").read_bytes() == (tiny_repo_folder / "model.safetensors").read_bytes()
    assert not staged_path(model.raw_dir).exists()


def test_a_cancelled_download_keeps_nothing_and_retries_from_zero(signed_in, hub, data_dir):
    from mistudio.staging import staged_path

    hub.bytes_per_second = 200_000
    created = api_download(signed_in, repo_id="tiny/llama", quantization="FP32")
    worker = start_worker()
    try:
        wait_for(lambda: Model.objects.get(pk=created["id"]).bytes_done > 100_000, timeout=60, message="bytes on disk")
        assert signed_in.post(f"/api/models/{created['id']}/cancel").json()["status"] == "cancelled"
        worker.communicate(timeout=30)
    finally:
        worker.kill()
    model = Model.objects.get(pk=created["id"])
    assert not model.raw_dir.exists() and not staged_path(model.raw_dir).exists()
    page = signed_in.get("/").content.decode()
    assert f'hx-post="/models/{model.id}/retry"' in page
    hub.clear_log()
    hub.bytes_per_second = None
    signed_in.post(f"/models/{model.id}/retry", HTTP_HX_REQUEST="true")
    run_burst_worker()
    model.refresh_from_db()
    assert model.status == ModelStatus.READY
    assert not any(r.range for r in hub.requests if r.path.endswith("/model.safetensors"))
