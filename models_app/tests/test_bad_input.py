"""Bad input: each case gets a clear message, and nothing is queued or written."""

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from mistudio.errors import InvalidInput
from mistudio.validation import validate_repo_id
from models_app.models import Model

BAD_REPO_IDS = [
    ("", "empty"),
    ("a" * 97, "at most 96 characters"),
    ("o/" + "a" * 190, "at most 96 characters"),
    ("owner/name/extra", "more than one '/'"),
    ("owner/na..me", "'..'"),
    ("owner/na--me", "'--'"),
    ("-owner/name", "start or end"),
    ("owner/name-", "start or end"),
    (".owner/name", "start or end"),
    ("owner/name.", "start or end"),
    ("owner/name.git", ".git"),
    ("owner/modèle", "non-ASCII"),
    ("owner/na me", "whitespace"),
    ("owner/name\n", "whitespace"),
    ("\towner/name", "whitespace"),
    ("https://huggingface.co/owner/name", "not a URL"),
    ("huggingface.co/owner/name", "more than one '/'"),
    ("owner/na\x00me", "NUL"),
    ("owner//name", "more than one '/'"),
    ("owner/", "may only use"),
    ("owner/na$me", "may only use"),
]


@pytest.mark.parametrize("repo_id, reason", BAD_REPO_IDS)
def test_a_bad_repo_id_is_refused_with_the_reason(repo_id, reason):
    with pytest.raises(InvalidInput) as caught:
        validate_repo_id(repo_id)
    assert reason in caught.value.message
    assert caught.value.field == "repo_id"


@pytest.mark.parametrize("repo_id", ["HuggingFaceTB/SmolLM2-135M", "gpt2", "EleutherAI/pythia-70m", "a/b", "Qwen/Qwen2.5-0.5B"])
def test_real_repo_ids_are_accepted(repo_id):
    assert validate_repo_id(repo_id) == repo_id


BAD_API_REQUESTS = [
    ({"repo_id": "owner/name.git", "quantization": "FP16"}, "invalid_repo_id", "repo_id"),
    ({"repo_id": "https://huggingface.co/a/b", "quantization": "FP16"}, "invalid_repo_id", "repo_id"),
    ({"repo_id": "", "quantization": "FP16"}, "invalid_repo_id", "repo_id"),
    ({"repo_id": "a/b", "quantization": "INT3"}, "invalid_input", "quantization"),
    ({"repo_id": "a/b", "quantization": "Q3"}, "invalid_input", "quantization"),
    ({"repo_id": "a/b", "quantization": "FP16", "revision": "my branch"}, "invalid_input", "revision"),
    ({"repo_id": "a/b", "quantization": "FP16", "revision": "../../etc"}, "invalid_input", "revision"),
]


@pytest.mark.django_db
@pytest.mark.parametrize("body, code, field", BAD_API_REQUESTS)
def test_the_api_refuses_bad_downloads_and_queues_nothing(signed_in, redis_clean, data_dir, body, code, field):
    response = signed_in.post("/api/models/download", body, content_type="application/json")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == code
    assert error["details"]["field"] == field
    assert error["message"]
    assert Model.objects.count() == 0
    assert redis_clean.keys("rq:job:*") == []
    assert not (data_dir / "models").exists()


@pytest.mark.django_db
def test_the_form_shows_a_bad_repo_id_under_the_field_without_a_reload(signed_in):
    response = signed_in.post(
        "/models/download", {"repo_id": "owner/name.git", "quantization": "FP16"}, HTTP_HX_REQUEST="true"
    )
    assert response.status_code == 422
    html = response.content.decode()
    assert 'id="repo-error"' in html and "drop the &#x27;.git&#x27; suffix" in html
    assert "<html" not in html  # a partial, swapped in place
    assert Model.objects.count() == 0


def _gguf_impostor(root):
    path = root / "fake.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a gguf")
    return str(path)


BAD_IMPORTS = [
    (lambda root: "/etc", "outside the allowed import folders"),
    (lambda root: str(root / "imports" / ".." / "secret"), "outside the allowed import folders"),
    (lambda root: str(root / "imports" / "missing"), "does not exist"),
    (lambda root: _gguf_impostor(root / "imports"), "is not a GGUF file"),
]


@pytest.mark.django_db
@pytest.mark.parametrize("make_path, message", BAD_IMPORTS)
def test_a_bad_import_path_is_refused_and_nothing_is_written(data_dir, redis_clean, make_path, message):
    with pytest.raises(CommandError) as caught:
        call_command("import_model", make_path(data_dir))
    assert message in str(caught.value)
    assert Model.objects.count() == 0
    assert not (data_dir / "models").exists()


@pytest.mark.django_db
def test_a_symlink_out_of_the_import_root_is_refused(data_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (data_dir / "imports" / "link").symlink_to(outside)
    with pytest.raises(CommandError, match="outside the allowed import folders"):
        call_command("import_model", str(data_dir / "imports" / "link"))
