"""Hostile input on every route: a clear 4xx in the shape the route speaks (JSON on /api/,
a page elsewhere), never a 500, and nothing written."""

import html
import subprocess

import pytest
from channels.testing import WebsocketCommunicator
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

pytestmark = pytest.mark.django_db

LONE_SURROGATE = '"\\ud800"'


def api_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"].startswith("application/json"), response.content[:300]
    error = response.json()["error"]
    assert error["message"]
    if code:
        assert error["code"] == code
    return error


@pytest.mark.parametrize(
    "path",
    ["/api/models/m_00%00", "/api/models?search=a%00b", "/api/models?status=%00", "/api/extractions?model_id=%00",
     "/api/datasets/ds_%00", "/api/extractions/ext_%00"],
)  # fmt: skip
def test_a_nul_in_an_id_or_query_parameter_is_a_400(signed_in, path):
    api_error(signed_in.get(path), 400, "invalid_text")


@pytest.mark.parametrize(
    "path, body",
    [
        ("/api/models/download", '{"repo_id": "a/b", "quantization": "FP16", "revision": "ma\\u0000in"}'),
        ("/api/models/download", '{"repo_id": "a/b\\u0000", "quantization": "FP16"}'),
        ("/api/models/download", '{"repo_id": "a/b", "quantization": "FP16", "access_token": ' + LONE_SURROGATE + "}"),
        ("/api/models/download", '{"repo_id": ' + LONE_SURROGATE + ', "quantization": "FP16"}'),
        ("/api/models/estimate", '{"repo_id": "a/b", "access_token": ' + LONE_SURROGATE + "}"),
        ("/api/datasets", '{"path": "/x\\u0000y"}'),
        ("/api/datasets", '{"repo_id": "a/b", "name": "n\\u0000"}'),
        ("/api/models/m_000000000000/extract", '{"dataset_id": "ds_\\u0000"}'),
    ],
)
def test_text_postgresql_cannot_store_is_refused_in_every_json_field(signed_in, redis_clean, path, body):
    api_error(signed_in.post(path, body, content_type="application/json"), 400)


@pytest.mark.parametrize(
    "body",
    ['{"repo_id": "a/b", "quantization": "FP16", "revision": ' + "9" * 5000 + "}",
     "[" * 100_000 + "]" * 100_000, '{"a": ' + "[" * 50 + "]" * 50 + "}"],
)  # fmt: skip
def test_over_long_integers_and_deep_nesting_are_invalid_json(signed_in, body):
    api_error(signed_in.post("/api/models/download", body, content_type="application/json"), 400, "invalid_json")


@pytest.mark.parametrize("token", ["hf_abc\x00def", "hf_abc\r\nX-Injected: 1", "hf_abc def", "hf_ünïcode"])
def test_a_token_that_cannot_go_in_a_header_is_refused_up_front(signed_in, redis_clean, token):
    from models_app.models import Model

    body = {"repo_id": "a/b", "quantization": "FP16", "access_token": token}
    error = api_error(signed_in.post("/api/models/download", body, content_type="application/json"), 400)
    assert error["details"]["field"] == "access_token" and token not in error["message"]
    assert Model.objects.count() == 0


def test_pages_of_a_missing_model_are_404_pages(signed_in):
    for response in (signed_in.get("/models/m_000000000000/extract"),
                     signed_in.post("/models/m_000000000000/extract/estimate", {"dataset_id": ""})):  # fmt: skip
        assert response.status_code == 404 and "text/html" in response["Content-Type"]
        assert "No model with id" in response.content.decode()


def test_api_errors_from_django_itself_answer_in_json(signed_in, user, settings):
    api_error(signed_in.get("/api/extractions/..%2F..%2Fetc/x"), 404, "not_found")
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    api_error(signed_in.post("/api/models/download", '{"repo_id": "' + "a" * 2000 + '"}', content_type="application/json"), 400)
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(user)
    api_error(strict.post("/api/models/download", {"repo_id": "a/b"}, content_type="application/json"), 403, "csrf_failed")


async def test_an_unknown_websocket_path_is_closed_not_a_server_error(user):
    from mistudio.asgi import application

    socket = WebsocketCommunicator(application, "/ws/nothing/here", headers=[(b"origin", b"http://localhost")])
    socket.scope["user"] = user
    connected, code = await socket.connect()
    assert (connected, code) == (False, 4404)


def parquet_bytes(table) -> bytes:
    import io

    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def damaged_footer() -> bytes:
    import pyarrow as pa

    data = bytearray(parquet_bytes(pa.table({"text": ["a line"] * 50})))
    footer = int.from_bytes(data[-8:-4], "little")
    data[-8 - footer : -8] = b"\xab" * footer  # the metadata, garbled; the magic bytes kept
    return bytes(data)


def no_text_column() -> bytes:
    import pyarrow as pa

    return parquet_bytes(pa.table({"body": ["a line"] * 5}))


# The uploads corpus: (file name, content, form fields, what the refusal says).
BAD_UPLOADS = [
    ("empty.txt", b"", {}, "is empty"),
    ("notes.pdf", b"%PDF-1.7 not a dataset", {}, "Upload a"),
    ("garbage.txt", bytes(range(256)) * 64, {}, "looks binary"),
    ("rows.jsonl", b'{"text": "fine"}\nnot json\n', {}, "line 2 is not JSON"),
    ("deep.jsonl", b'{"text": "fine"}\n' + b"[" * 200_000 + b"]" * 200_000 + b"\n", {}, "line 2 is not JSON (nested too deep)"),
    ("rows.jsonl", b'{"text": "nul \\u0000 inside"}\n', {}, "NUL character or an unpaired surrogate"),
    ("rows.jsonl", b'{"text": "half \\ud800 pair"}\n', {}, "NUL character or an unpaired surrogate"),
    ("late.txt", b"fine line\n" * 1000 + b"\xff\xfe broken\n", {}, "is not UTF-8"),
    ("mixed.txt", "caf\u00e9 in UTF-8\n".encode() * 900 + "caf\u00e9 in Latin-1\n".encode("latin-1"), {}, "is not UTF-8"),
    ("late.txt", b"fine line\n" * 1000 + b"nul \x00 here\n", {}, "NUL character"),
    ("late.csv", b"text\n" + b"fine line\n" * 1000 + b"nul \x00 here\n", {}, "NUL character"),
    ("random.parquet", bytes(range(256)) * 40, {}, "cannot be read as .parquet"),
    ("footer.parquet", None, {}, "its metadata or data is damaged"),
    ("columns.parquet", None, {}, "has no column 'text'"),
    ("notes.txt", b"one\ntwo\n", {"name": "bad\x00name"}, "NUL"),
    ("notes.txt", b"one\ntwo\n", {"text_column": "c" * 101}, "1 to 100 characters"),
]
MADE = {"footer.parquet": damaged_footer, "columns.parquet": no_text_column}


@pytest.mark.django_db(transaction=True)
def test_the_uploads_corpus_is_refused_with_the_reason_and_leaves_nothing(signed_in, data_dir):
    """Each bad file through the API and the page: a 400 that says why, no row, no folder."""
    from activations_app.models import Dataset

    for name, content, fields, message in BAD_UPLOADS:
        content = MADE[name]() if content is None else content
        response = signed_in.post("/api/datasets", {"file": SimpleUploadedFile(name, content), **fields})
        error = api_error(response, 400)
        assert message in error["message"], (name, error["message"])
        page = signed_in.post("/datasets/upload", {"file": SimpleUploadedFile(name, content), **fields})
        assert page.status_code == 400 and message in html.unescape(page.content.decode()), name
        assert Dataset.objects.count() == 0, name
        left = sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*"))
        assert left in (["imports"], ["datasets", "imports"]), (name, left)
    print(f"\nuploads corpus: {len(BAD_UPLOADS)} files, each through the API and the page")


def test_an_upload_that_claims_2_gb_is_refused_before_it_is_read(signed_in, settings, data_dir):
    """A 2 GB sparse file: refused from its Content-Length (413) before any byte is read."""
    response = signed_in.post("/api/datasets", b"--x--", content_type="multipart/form-data; boundary=x",
                              CONTENT_LENGTH=str(2 * 1024**3))  # fmt: skip
    assert api_error(response, 413, "request_too_large")
    assert not (data_dir / "datasets").exists()


@pytest.fixture
def tiny_disk(tmp_path, settings):
    """A 1 MB filesystem as the data dir (a real tmpfs: writes fail with ENOSPC)."""
    mount = tmp_path / "tiny-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    settings.DATA_DIR = mount
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.django_db(transaction=True)
def test_an_upload_that_fills_the_disk_is_refused_and_leaves_nothing(signed_in, tiny_disk):
    from activations_app.models import Dataset

    content = b"a line of text that fills the disk\n" * 60_000  # about 2 MB
    error = api_error(signed_in.post("/api/datasets", {"file": SimpleUploadedFile("big.txt", content)}), 400, "disk_full")
    assert "disk is full" in error["message"]
    assert Dataset.objects.count() == 0
    assert list(tiny_disk.iterdir()) == []


def test_a_symlinked_file_in_an_import_folder_is_refused_when_it_points_outside(data_dir, tmp_path, redis_clean):
    from django.core.management import call_command
    from django.core.management.base import CommandError

    from models_app.models import Model
    from models_app.tests.support import write_tiny_model

    outside = write_tiny_model(tmp_path / "outside")
    folder = data_dir / "imports" / "linked"
    folder.mkdir()
    (folder / "config.json").write_text((outside / "config.json").read_text())
    (folder / "model.safetensors").symlink_to(outside / "model.safetensors")
    with pytest.raises(CommandError, match="links to files outside the allowed import folders"):
        call_command("import_model", str(folder))
    assert Model.objects.count() == 0
    assert not (data_dir / "models").exists()
