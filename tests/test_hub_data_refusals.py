"""Hub dataset errors are clear refusals (issue 17, item 9): a damaged parquet file and a
missing text column are known when the import is asked for, from the first file's footer,
before any record exists; a damaged file further into a streamed split fails its job with a
sentence, not "internal_error"."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from activations_app import jobs
from activations_app.models import Dataset
from models_app.tests.hub_server import HubRepo, make_sha

pytestmark = pytest.mark.django_db(transaction=True)


def parquet(path, **columns):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def serve(hub, tmp_path, repo_id, files):
    folder = tmp_path / repo_id.replace("/", "_")
    for name, write in files.items():
        write(folder / name)
    hub.add_repo(HubRepo(repo_id, folder, make_sha(repo_id), repo_type="dataset"))


def ask(client, **body):
    return client.post("/api/datasets", json.dumps(body), content_type="application/json")


def test_a_damaged_file_and_a_missing_column_are_refused_before_any_record(signed_in, hub, tmp_path):
    def damaged(path):
        good = parquet(path, text=["a", "b"])
        data = bytearray(good.read_bytes())
        data[-40:-8] = b"\xff" * 32  # the footer's metadata, overwritten
        good.write_bytes(bytes(data))

    serve(hub, tmp_path, "corpora/damaged", {"data/train-00000-of-00001.parquet": damaged})
    serve(hub, tmp_path, "corpora/other-column", {"data/train-00000-of-00001.parquet": lambda p: parquet(p, content=["x"], id=[1])})
    serve(hub, tmp_path, "corpora/numbers", {"data/train-00000-of-00001.parquet": lambda p: parquet(p, text=[1, 2])})
    serve(hub, tmp_path, "corpora/lines", {"train.jsonl": lambda p: (p.parent.mkdir(parents=True, exist_ok=True), p.write_text('{"body": "x"}\n'))})

    refused = ask(signed_in, repo_id="corpora/damaged")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "corrupt_file", refused.content
    assert "damaged" in refused.json()["error"]["message"]
    refused = ask(signed_in, repo_id="corpora/other-column")
    assert refused.status_code == 400 and "has no column 'text' (columns: ['content', 'id'])" in refused.json()["error"]["message"]
    refused = ask(signed_in, repo_id="corpora/numbers")
    assert refused.status_code == 400 and "holds int64, not text" in refused.json()["error"]["message"]
    refused = ask(signed_in, repo_id="corpora/lines")
    assert refused.status_code == 400 and "'text'" in refused.json()["error"]["message"]
    assert not Dataset.objects.exists()
    # Fetched to decide: the footer by Range, never the whole file.
    assert all(r.range for r in hub.requests if r.method == "GET" and r.path.endswith(".parquet"))

    accepted = ask(signed_in, repo_id="corpora/other-column", text_column="content")
    assert accepted.status_code == 202, accepted.content


def test_a_damaged_file_further_into_a_streamed_split_fails_its_job_with_a_sentence(signed_in, hub, tmp_path):
    def damaged(path):
        parquet(path, text=["c"])
        path.write_bytes(path.read_bytes()[:-30] + b"\0" * 30)

    serve(hub, tmp_path, "corpora/half", {"data/train-00000-of-00002.parquet": lambda p: parquet(p, text=["a", "b"]),
                                          "data/train-00001-of-00002.parquet": damaged})  # fmt: skip
    created = ask(signed_in, repo_id="corpora/half")
    assert created.status_code == 202, created.content
    with pytest.raises(Exception):  # noqa: B017 - the job re-raises its JobError for RQ to record
        jobs.run_dataset_import(created.json()["id"])
    failed = Dataset.objects.get(pk=created.json()["id"])
    assert (failed.status, failed.error_code) == ("error", "corrupt_file"), (failed.error_code, failed.error_message)
    assert "train-00001-of-00002.parquet" in failed.error_message and "damaged" in failed.error_message
