"""The JSON API: authentication, listing, errors in the DESIGN.md shape."""

import pytest
from django.core.management import call_command

from mistudio.models import ApiToken
from models_app.models import Model

pytestmark = pytest.mark.django_db


def make_model(**fields) -> Model:
    defaults = {"name": "SmolLM2-135M", "repo_id": "HuggingFaceTB/SmolLM2-135M", "status": "ready", "architecture": "llama"}
    return Model.objects.create(**{**defaults, **fields})


def assert_error(response, status: int, code: str):
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert error["code"] == code
    assert set(error) == {"code", "message", "details", "retryable"}
    return error


@pytest.mark.parametrize("method, path", [("get", "/api/models"), ("post", "/api/models/download"), ("get", "/api/models/m_123"), ("delete", "/api/models/m_123")])
def test_every_api_call_needs_a_signed_in_user_or_a_token(outsider_client, method, path):
    assert_error(getattr(outsider_client, method)(path), 401, "not_authenticated")


def test_pages_redirect_anonymous_visitors_to_sign_in(outsider_client):
    response = outsider_client.get("/")
    assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_an_api_token_made_by_the_command_signs_requests_in(outsider_client, user, capsys):
    call_command("create_api_token", user.username)
    raw = capsys.readouterr().out.strip()
    assert raw.startswith("mis_")
    make_model()
    response = outsider_client.get("/api/models", HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert response.status_code == 200 and response.json()["pagination"]["total"] == 1
    assert ApiToken.objects.get().key_hash != raw  # only the hash is stored


def test_a_bearer_token_can_post_without_csrf_but_a_wrong_one_is_refused(redis_clean, user, data_dir):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    _, raw = ApiToken.issue(user)
    body = {"repo_id": "tiny/llama", "quantization": "FP16"}
    ok = client.post("/api/models/download", body, content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert ok.status_code == 202
    bad = client.post("/api/models/download", body, content_type="application/json", HTTP_AUTHORIZATION="Bearer mis_nope")
    assert_error(bad, 401, "invalid_api_token")


def test_a_session_post_without_the_csrf_token_is_refused(user):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    response = client.post("/api/models/download", {"repo_id": "a/b"}, content_type="application/json")
    assert response.status_code == 403
    assert Model.objects.count() == 0


def test_the_list_paginates_filters_by_status_and_searches(signed_in):
    for i in range(25):
        make_model(name=f"model-{i:02d}", status="ready" if i % 5 else "error")
    make_model(name="pythia-70m", repo_id="EleutherAI/pythia-70m", architecture="gpt_neox")
    page = signed_in.get("/api/models?limit=10&page=3").json()
    assert page["pagination"] == {"page": 3, "limit": 10, "total": 26, "pages": 3, "has_next": False}
    assert len(page["data"]) == 6
    errors = signed_in.get("/api/models?status=error").json()
    assert errors["pagination"]["total"] == 5 and {m["status"] for m in errors["data"]} == {"error"}
    found = signed_in.get("/api/models?search=gpt_neox").json()["data"]
    assert [m["name"] for m in found] == ["pythia-70m"]
    assert "architecture_config" not in found[0]


@pytest.mark.parametrize("query", ["limit=0", "limit=101", "page=0", "page=x", "status=done", "limit=²", "page=１"])
def test_bad_list_parameters_are_400(signed_in, query):
    assert_error(signed_in.get(f"/api/models?{query}"), 400, "invalid_parameter")


def test_a_missing_model_is_404_and_deleting_it_is_harmless(signed_in):
    assert_error(signed_in.get("/api/models/m_000000000000"), 404, "model_not_found")
    response = signed_in.delete("/api/models/m_000000000000")
    assert response.status_code == 200 and response.json()["deleted"] is False


def test_a_body_that_is_not_json_is_400(signed_in):
    assert_error(signed_in.post("/api/models/download", "{nope", content_type="application/json"), 400, "invalid_json")


def test_when_redis_is_down_a_download_is_503_and_nothing_is_created(signed_in, settings):
    settings.RQ_QUEUES = {"default": {"URL": "redis://127.0.0.1:1/0", "DEFAULT_TIMEOUT": 60}}
    response = signed_in.post("/api/models/download", {"repo_id": "a/b", "quantization": "FP16"}, content_type="application/json")
    error = assert_error(response, 503, "queue_unavailable")
    assert error["retryable"] is True
    assert Model.objects.count() == 0


def test_a_token_given_to_the_api_is_never_echoed_or_stored_in_clear(
    signed_in, redis_clean, django_capture_on_commit_callbacks
):
    token = "hf_supersecretvalue1234567890"
    with django_capture_on_commit_callbacks(execute=True):
        response = signed_in.post(
            "/api/models/download",
            {"repo_id": "a/b", "quantization": "FP16", "access_token": token},
            content_type="application/json",
        )
    assert token not in response.content.decode()
    model = Model.objects.get()
    assert token.encode() not in bytes(model.encrypted_token)
    assert token not in signed_in.get("/").content.decode()
    job_keys = redis_clean.keys("rq:job:*")
    assert job_keys and all(token.encode() not in b"".join(redis_clean.hgetall(k).values()) for k in job_keys)


def test_a_duplicate_download_asks_first_in_the_api_the_page_and_the_command(signed_in, redis_clean):
    from django.core.management import call_command
    from django.core.management.base import CommandError

    first = signed_in.post("/api/models/download", {"repo_id": "tiny/llama", "quantization": "FP16"}, content_type="application/json")
    assert first.status_code == 202
    again = signed_in.post("/api/models/download", {"repo_id": "tiny/llama", "quantization": "FP16"}, content_type="application/json")
    assert again.status_code == 409 and again.json()["error"]["code"] == "duplicate_download"
    assert again.json()["error"]["details"]["existing_id"] == first.json()["id"]
    assert Model.objects.count() == 1  # nothing made
    other_format = signed_in.post("/api/models/download", {"repo_id": "tiny/llama", "quantization": "FP32"}, content_type="application/json")
    assert other_format.status_code == 202  # another format is not a duplicate
    page = signed_in.post("/models/download", {"repo_id": "tiny/llama", "quantization": "FP16"}, HTTP_HX_REQUEST="true")
    html = page.content.decode()
    assert page.status_code == 409 and "is already here" in html and 'name="allow_duplicate"' in html
    assert 'value="tiny/llama"' in html  # the repo id is kept in the form
    anyway = signed_in.post("/models/download", {"repo_id": "tiny/llama", "quantization": "FP16", "allow_duplicate": "on"},
                            HTTP_HX_REQUEST="true")  # fmt: skip
    assert anyway.status_code == 200 and Model.objects.filter(repo_id="tiny/llama", requested_quantization="FP16").count() == 2
    with pytest.raises(CommandError, match="already here"):
        call_command("download_model", "tiny/llama", "--quantization", "FP16")
    call_command("download_model", "tiny/llama", "--quantization", "FP16", "--allow-duplicate")
    assert Model.objects.filter(repo_id="tiny/llama", requested_quantization="FP16").count() == 3
