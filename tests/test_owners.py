"""Several users on one instance: everyone reads every record and may use a ready model or
dataset to make their own; only the owner or staff may cancel or delete. Signing out
closes the session's sockets; a socket from another port of an allowed host is refused."""

import json

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client

from activations_app.ml.extract import ExtractionSpec
from activations_app.models import Dataset, Extraction
from models_app.models import Model

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", password="alice-password-1")


@pytest.fixture
def bob(django_user_model):
    return django_user_model.objects.create_user("bob", password="bob-password-1")


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_user("carol", password="carol-password-1", is_staff=True)


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def alices_records(alice, smollm2_model, data_dir):
    smollm2_model.owner = alice
    smollm2_model.save(update_fields=["owner"])
    (data_dir / "imports" / "t.txt").write_text("".join(f"Line {i} of Alice's corpus.\n" for i in range(30)))
    from activations_app import services

    dataset = services.import_dataset(path=str(data_dir / "imports" / "t.txt"), user=alice)
    running = Model.objects.create(name="alice-running", status="downloading", owner=alice)
    idle = Model.objects.create(name="alice-idle", status="ready", owner=alice)
    extraction = Extraction.objects.create(model=smollm2_model, dataset=dataset, status="queued", owner=alice,
                                           **ExtractionSpec(layers=[0], hook_types=["mlp"]).request())  # fmt: skip
    return {"model": smollm2_model, "dataset": dataset, "running": running, "idle": idle, "extraction": extraction}


def test_another_user_reads_and_uses_alices_records_but_cannot_cancel_or_delete_them(bob, alices_records, redis_clean):
    records, as_bob = alices_records, client_for(bob)
    assert as_bob.get(f"/api/models/{records['model'].id}").status_code == 200
    assert as_bob.get(f"/api/datasets/{records['dataset'].id}").status_code == 200
    assert as_bob.get(f"/api/extractions/{records['extraction'].id}").status_code == 200
    refused = [
        as_bob.post(f"/api/models/{records['running'].id}/cancel"),
        as_bob.delete(f"/api/models/{records['idle'].id}"),
        as_bob.delete(f"/api/datasets/{records['dataset'].id}"),
        as_bob.post(f"/api/extractions/{records['extraction'].id}/cancel"),
        as_bob.post(f"/models/{records['running'].id}/cancel", HTTP_HX_REQUEST="true"),
        as_bob.post(f"/datasets/{records['dataset'].id}/delete"),
    ]
    for response in refused[:4]:
        assert response.status_code == 403 and response.json()["error"]["code"] == "not_owner", response.content
        assert "Only alice" in response.json()["error"]["message"]
    assert refused[4].status_code == 403 and "Only alice" in refused[4].content.decode()
    assert refused[5].status_code == 403 and "Only alice" in refused[5].content.decode()
    assert Model.objects.get(pk=records["running"].id).status == "downloading"
    assert Dataset.objects.filter(pk=records["dataset"].id).exists()
    assert Extraction.objects.get(pk=records["extraction"].id).status == "queued"
    # Using Alice's ready model and dataset makes Bob's own extraction, which Bob may cancel.
    body = {"dataset_id": records["dataset"].id, "layers": [0], "hook_types": ["residual"], "max_samples": 2}
    made = as_bob.post(f"/api/models/{records['model'].id}/extract", body, content_type="application/json").json()
    assert Extraction.objects.get(pk=made["id"]).owner == bob
    assert as_bob.post(f"/api/extractions/{made['id']}/cancel").status_code == 200
    # A record with no owner (made at the shell without --user, or before owners) is everyone's.
    legacy = Model.objects.create(name="legacy", status="queued")
    assert as_bob.post(f"/api/models/{legacy.id}/cancel").status_code == 200


def test_the_owner_and_staff_may_cancel_and_delete(alice, staff, alices_records, redis_clean):
    records = alices_records
    assert client_for(alice).post(f"/api/extractions/{records['extraction'].id}/cancel").status_code == 200
    as_staff = client_for(staff)
    assert as_staff.post(f"/api/models/{records['running'].id}/cancel").json()["status"] == "cancelled"
    assert as_staff.delete(f"/api/datasets/{records['dataset'].id}").json()["deleted"] is True


def test_commands_act_as_the_user_they_are_given(alice, bob, alices_records, capsys):
    running = alices_records["running"]
    Model.objects.filter(pk=running.pk).update(status="error")
    with pytest.raises(CommandError, match="Only alice"):
        call_command("delete_model", running.id, "--user", "bob")
    with pytest.raises(CommandError, match="No active user 'nobody'"):
        call_command("delete_model", running.id, "--user", "nobody")
    call_command("delete_model", running.id, "--user", "alice", "--json")
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["deleted"] is True


def test_the_admin_lists_and_filters_by_owner(alice, bob, django_user_model):
    admin = django_user_model.objects.create_superuser("root", password="root-password-1")
    Model.objects.create(name="alices", owner=alice, status="ready")
    Model.objects.create(name="bobs", owner=bob, status="ready")
    as_admin = client_for(admin)
    page = as_admin.get("/admin/models_app/model/").content.decode()
    assert "column-owner" in page and "alices" in page and "bobs" in page
    filtered = as_admin.get(f"/admin/models_app/model/?owner__id__exact={alice.pk}").content.decode()
    assert "alices" in filtered and "bobs" not in filtered
    dataset = Dataset.objects.create(name="alices-corpus", source="upload", file_path="", owner=alice)
    Extraction.objects.create(model=Model.objects.get(name="alices"), dataset=dataset, status="failed", owner=alice,
                              **ExtractionSpec(layers=[0], hook_types=["mlp"]).request())  # fmt: skip
    for path in ("/admin/activations_app/dataset/", "/admin/activations_app/extraction/"):
        page = as_admin.get(path).content.decode()
        assert "column-owner" in page and ">alice<" in page
    assert as_admin.get("/admin/models_app/model/add/").status_code == 403
    assert as_admin.get("/admin/activations_app/extraction/add/").status_code == 403


def session_socket(path: str, client: Client, origin: str = "http://localhost:8000", host: str = "localhost:8000"):
    from mistudio.asgi import application

    cookie = client.cookies["sessionid"].value
    return WebsocketCommunicator(application, path, headers=[
        (b"origin", origin.encode()), (b"host", host.encode()), (b"cookie", f"sessionid={cookie}".encode()),
    ])  # fmt: skip


async def test_signing_out_closes_that_sessions_sockets(alice):
    client = await database_sync_to_async(client_for)(alice)
    socket = session_socket("/ws/models/", client)
    connected, _ = await socket.connect()
    assert connected
    await socket.receive_from(timeout=10)
    response = await database_sync_to_async(client.post)("/logout/")
    assert response.status_code == 302
    closed = await socket.receive_output(timeout=10)
    assert closed == {"type": "websocket.close", "code": 4401}


async def test_a_socket_from_another_port_of_an_allowed_host_is_refused(alice):
    client = await database_sync_to_async(client_for)(alice)
    foreign = session_socket("/ws/models/", client, origin="http://localhost:9999")
    connected, _ = await foreign.connect()
    assert not connected
    own = session_socket("/ws/models/", client)
    connected, _ = await own.connect()
    assert connected
    await own.disconnect()
