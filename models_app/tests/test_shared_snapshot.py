"""One raw snapshot per repo@revision, checked as it arrives: a second format of the same
commit fetches no weights and shares the folder (one card, the bytes counted once), a byte
damaged on the way is caught by the Hub's own hash and fetched again, and verify_model finds
a file changed on disk afterwards. Real worker, loopback Hub, PostgreSQL."""

import hashlib
import subprocess

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from models_app.models import Model, ModelStatus
from models_app.tests.support import run_burst_worker

pytestmark = pytest.mark.django_db(transaction=True)


def api_download(client, **body):
    response = client.post("/api/models/download", body, content_type="application/json")
    assert response.status_code == 202, response.content
    return Model.objects.get(pk=response.json()["id"])


def resolve_gets(hub, suffix=""):
    return [r for r in hub.requests if r.method == "GET" and "/resolve/" in r.path and r.path.endswith(suffix)]


def du_bytes(path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def test_a_second_format_of_the_same_commit_fetches_no_weights_and_shares_one_snapshot(signed_in, hub, data_dir):
    first = api_download(signed_in, repo_id="tiny/llama", quantization="FP32")
    run_burst_worker()
    first.refresh_from_db()
    assert first.status == ModelStatus.READY, first.error_message
    snapshot = du_bytes(first.raw_dir)

    hub.clear_log()
    second = api_download(signed_in, repo_id="tiny/llama", quantization="FP16")
    run_burst_worker()
    second.refresh_from_db()
    assert second.status == ModelStatus.READY, second.error_message
    weight_bytes = sum(r.body_bytes for r in resolve_gets(hub))
    print(f"second format: {len(hub.requests)} Hub requests ({[r.path.split('?')[0] for r in hub.requests]}), "
          f"{weight_bytes} file bytes fetched")  # fmt: skip
    assert resolve_gets(hub) == [] and weight_bytes == 0  # only the commit was asked for (model_info)
    assert second.snapshot_of == first.id and second.raw_dir == first.raw_dir
    assert "no weights fetched" in second.notice
    assert sorted(p.name for p in (data_dir / "models" / "raw").iterdir()) == [first.id]

    # du counts the snapshot once: it is one folder, beside the FP16 weights made from it.
    fp16 = du_bytes(second.quantized_dir("FP16"))
    total = du_bytes(data_dir / "models")
    print(f"du: snapshot {snapshot:,} B, FP16 {fp16:,} B, data dir's models {total:,} B")
    assert snapshot + fp16 <= total < snapshot + fp16 + 64 * 1024

    # One card for the repo@revision, its two formats as rows; the shared bytes said once.
    page = signed_in.get("/").content.decode()
    group = page.split(f'id="model-group-{first.id}"')[1].split("</section>")[0]
    assert f'id="model-card-{first.id}"' in group and f'id="model-card-{second.id}"' in group
    assert page.count('class="model-group ') == 1
    assert "2 formats" in group and "counted once" in group and "(the raw snapshot, shared)" not in group.split(second.id)[0]
    api = signed_in.get(f"/api/models/{second.id}").json()
    assert api["snapshot_id"] == first.id

    # Deleting a row deletes that format only; the snapshot goes with its last user.
    assert signed_in.delete(f"/api/models/{first.id}").json()["deleted"] is True
    assert second.raw_dir.is_dir() and second.quantized_dir("FP16").is_dir()
    page = signed_in.get("/").content.decode()
    assert f'id="model-card-{second.id}"' in page and "1 format" in page
    assert signed_in.delete(f"/api/models/{second.id}").json()["deleted"] is True
    assert not second.raw_dir.exists() and not any((data_dir / "models").rglob("*.safetensors"))


@pytest.mark.parametrize("damaged", ["model.safetensors", "config.json"])
def test_a_byte_flipped_on_the_way_is_caught_by_the_hubs_hash_and_fetched_again(hub, data_dir, tiny_repo_folder, damaged):
    hub.damage_next_downloads[damaged] = 1
    call_command("download_model", "tiny/llama", "--sync")
    model = Model.objects.get()
    assert model.status == ModelStatus.READY, model.error_message
    assert len(resolve_gets(hub, f"/{damaged}")) == 2  # the damaged copy, then a good one
    assert (model.raw_dir / damaged).read_bytes() == (tiny_repo_folder / damaged).read_bytes()
    assert model.bytes_done == model.bytes_total  # the bar went back for the bytes fetched again, not past 100 %


def test_a_file_damaged_twice_fails_with_a_clear_message_and_keeps_nothing(hub, data_dir):
    hub.damage_next_downloads["model.safetensors"] = 2
    with pytest.raises(CommandError) as caught:
        call_command("download_model", "tiny/llama", "--sync")
    message = str(caught.value)
    assert "[checksum_mismatch]" in message and "model.safetensors arrived damaged twice" in message
    assert "the Hub lists" in message
    model = Model.objects.get()
    assert (model.status, model.error_code) == (ModelStatus.ERROR, "checksum_mismatch")
    assert not any((data_dir / "models").rglob("*.safetensors*"))  # no damaged file where a good one is expected


def test_verify_model_finds_a_byte_changed_on_disk_by_command_api_and_button(signed_in, hub, data_dir, tiny_repo_folder):
    call_command("download_model", "tiny/llama", "--sync")
    model = Model.objects.get()
    call_command("verify_model", model.id)
    model.refresh_from_db()
    assert model.verification["state"] == "ok" and model.verification["checked"] == 3  # config, generation config, weights
    weights = model.raw_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 3] ^= 0x10
    weights.write_bytes(bytes(data))

    with pytest.raises(CommandError) as caught:
        call_command("verify_model", model.id)
    assert "[failed] model.safetensors has changed since it was downloaded" in str(caught.value)
    assert hashlib.sha256(bytes(data)).hexdigest()[:16] in str(caught.value)

    # The API queues the check; the card says so, then shows what the worker found.
    response = signed_in.post(f"/api/models/{model.id}/verify")
    assert response.status_code == 202 and response.json()["verification"]["state"] == "checking"
    assert "Checking the files against their SHA-256" in signed_in.get("/").content.decode()
    run_burst_worker()
    model.refresh_from_db()
    assert model.verification["state"] == "failed"
    page = signed_in.get("/").content.decode()
    assert "model.safetensors has changed since it was downloaded" in page and "Verify files" in page
    # The button (an htmx post) answers with the card, "checking" again.
    card = signed_in.post(f"/models/{model.id}/verify", HTTP_HX_REQUEST="true").content.decode()
    assert f'id="model-card-{model.id}"' in card and "Checking the files" in card


def test_a_check_whose_job_is_lost_says_so_instead_of_checking_for_ever(signed_in, hub, data_dir, redis_clean):
    """Redis losing the queued check (or its worker killed) must not leave the card at
    "Checking…" for ever: once RQ no longer holds the job, the card says it stopped."""
    from rq.job import Job

    from mistudio.queue import queue

    call_command("download_model", "tiny/llama", "--sync")
    model = Model.objects.get()
    assert signed_in.post(f"/api/models/{model.id}/verify").status_code == 202
    model.refresh_from_db()
    assert "Checking the files" in signed_in.get("/").content.decode()  # queued, no worker yet
    Job.fetch(model.verification["job_id"], connection=queue().connection).delete()
    page = signed_in.get("/").content.decode()
    assert "Checking the files" not in page and "The check stopped before it finished" in page
