"""A streamed gated Hub dataset is read only with its importer's token (issue 17, item 10):
another user's extraction of it is refused before anything is queued, and a job that reads
it on someone else's behalf (a row made before the check) fails without sending the token."""

import json

import pytest
from django.test import Client

from activations_app import jobs, services
from activations_app.models import Extraction
from conftest import GATED_TOKEN
from models_app.tests.hub_server import HubRepo, make_sha

pytestmark = pytest.mark.django_db(transaction=True)


def test_another_users_extraction_of_a_gated_stream_is_refused_and_never_sends_the_token(user, django_user_model, hub, tmp_path, tiny_model):
    repo = tmp_path / "gated-corpus"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "train.jsonl").write_text("".join(json.dumps({"text": f"line {i} of the gated corpus"}) + "\n" for i in range(50)))
    hub.add_repo(HubRepo("corpora/gated", repo, make_sha("corpora/gated"), repo_type="dataset", gated=True,
                         allowed_tokens=frozenset({GATED_TOKEN})))  # fmt: skip
    dataset = services.import_dataset(path="corpora/gated", token=GATED_TOKEN, enqueue=False, user=user)
    jobs.run_dataset_import(dataset.id)
    request = dict(layers=[0], hook_types=["residual"], max_samples=4, batch_size=4, seq_len=8)

    other = django_user_model.objects.create_user("other-researcher", password="another-password-1")
    client = Client()
    client.force_login(other)
    refused = client.post(f"/api/models/{tiny_model.id}/extract", {"dataset_id": dataset.id, **request}, content_type="application/json")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "gated_token_required", refused.content
    assert "your own token" in refused.json()["error"]["message"] and not Extraction.objects.exists()

    # A row that got past the check (made before it existed): its job refuses to read on another's token.
    hub.clear_log()
    theirs = Extraction.objects.create(model=tiny_model, dataset=dataset, owner=other, **services.validate_extraction(tiny_model, request).request())
    with pytest.raises(Exception):  # noqa: B017 - re-raised for RQ
        jobs.run_extraction_job(theirs.id)
    theirs.refresh_from_db()
    assert (theirs.status, theirs.error_code) == ("failed", "gated_token_required")
    assert not [r for r in hub.requests if r.authorization]  # the owner's token never left

    mine = services.request_extraction(model_id=tiny_model.id, dataset_id=dataset.id, enqueue=False, user=user, **request)
    jobs.run_extraction_job(mine.id)
    mine.refresh_from_db()
    assert mine.status == "completed", mine.error_message
