"""A dataset's numbers come from the whole dataset: characters per row over every row at
import, tokens per row with a chosen model's tokenizer by a job, whole rows a page at a
time in Samples, and a Hub-streamed split says which share it measured."""

import json

import numpy as np
import pytest

from activations_app import jobs, services
from activations_app.models import Dataset, DatasetStatus
from models_app.tests.hub_server import HubRepo, make_sha
from models_app.tests.support import run_burst_worker

pytestmark = pytest.mark.django_db(transaction=True)


def varied_rows(n: int = 600) -> list[str]:
    """Rows from 3 to ~4,000 characters, words of real English, so lengths and token counts spread."""
    rng = np.random.default_rng(7)
    words = "the river runs past the old mill where children count boats under a grey sky".split()
    return [" ".join(rng.choice(words, size=int(rng.lognormal(3.0, 1.2)) + 1)) for _ in range(n)]


@pytest.fixture
def corpus(data_dir):
    rows = varied_rows()
    path = data_dir / "imports" / "varied.jsonl"
    path.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))
    return rows, services.import_dataset(path=str(path))


def test_characters_per_row_are_measured_over_every_row_at_import(signed_in, corpus):
    rows, dataset = corpus
    stats = dataset.statistics
    lengths = np.array([len(row) for row in rows])
    assert (stats["rows"], stats["complete"]) == (600, True)
    chars = stats["chars"]
    assert (chars["min"], chars["max"]) == (lengths.min(), lengths.max()) and lengths.max() > 1000
    assert chars["median"] == pytest.approx(np.median(lengths)) and chars["p95"] == pytest.approx(np.percentile(lengths, 95))
    assert sum(chars["histogram"]["counts"]) == 600 and chars["histogram"]["log"]  # a long tail: log-spaced bins

    html = signed_in.get(f"/datasets/{dataset.id}").content.decode()
    assert "Over every row (600)" in html and f"max {lengths.max():,}" in html
    assert "(first 5 rows)" not in html  # the old five-row figure is gone
    api = signed_in.get(f"/api/datasets/{dataset.id}").json()
    assert api["statistics"]["chars"]["max"] == lengths.max()


def test_samples_show_whole_rows_a_page_at_a_time_and_the_preview_marks_its_cut(signed_in, corpus):
    rows, dataset = corpus
    long_index = next(i for i, row in enumerate(rows) if len(row) > 300)
    assert all(len(p) <= 300 for p in dataset.preview)
    assert all(p.endswith("…") for p, row in zip(dataset.preview, rows) if len(row) > 300)
    page = (long_index // services.SAMPLES_PER_PAGE) + 1
    html = signed_in.get(f"/datasets/{dataset.id}/samples?page={page}").content.decode()
    assert rows[long_index].replace("'", "&#x27;") in html  # the whole row, not its first 300 characters
    assert f"Row {long_index + 1:,} · {len(rows[long_index]):,} characters" in html
    first = signed_in.get(f"/datasets/{dataset.id}/samples?page=1").content.decode()
    assert "Whole rows 1–10 of 600" in first and "samples-next" in first and "samples-previous" not in first
    last = signed_in.get(f"/datasets/{dataset.id}/samples?page=60").content.decode()
    assert "Whole rows 591–600 of 600" in last and "samples-next" not in last


def test_tokens_per_row_are_counted_by_a_job_with_the_chosen_models_tokenizer(signed_in, corpus, smollm2_model):
    from transformers import AutoTokenizer

    rows, dataset = corpus
    response = signed_in.post(f"/api/datasets/{dataset.id}/statistics", {"model_id": smollm2_model.id},
                              content_type="application/json")  # fmt: skip
    assert response.status_code == 202 and response.json()["statistics"]["state"] == "computing"
    assert "Measuring characters and tokens per row" in signed_in.get(f"/datasets/{dataset.id}/statistics").content.decode()
    run_burst_worker()
    dataset.refresh_from_db()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_model.weights_dir)
    counts = np.array([len(tokenizer(row, add_special_tokens=False)["input_ids"]) for row in rows])
    tokens = dataset.statistics["tokens"]
    assert dataset.statistics["state"] == "ready" and dataset.statistics["model_id"] == smollm2_model.id
    assert (tokens["min"], tokens["max"], tokens["median"]) == (counts.min(), counts.max(), np.median(counts))
    html = signed_in.get(f"/datasets/{dataset.id}/statistics").content.decode()
    assert "tokens by SmolLM2-135M FP32's tokenizer" in html and "Tokens per row" in html
    assert "Histogram of tokens per row" in html

    # The Tokenization tab reads whole rows too: its token counts are for the full text.
    tab = signed_in.get(f"/datasets/{dataset.id}/tokens", {"model_id": smollm2_model.id}).content.decode()
    assert f">{counts[0]:,}<" in tab or f">{counts[0]}<" in tab


def test_a_streamed_split_says_which_share_it_measured(signed_in, hub, data_dir, settings, tmp_path):
    folder = tmp_path / "streamed"
    (folder / "data").mkdir(parents=True)
    rows = varied_rows(300)
    (folder / "data" / "train.jsonl").write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))
    hub.add_repo(HubRepo("corpora/varied", folder, make_sha("corpora/varied"), repo_type="dataset"))
    dataset = services.import_dataset(path="corpora/varied", enqueue=False)
    jobs.run_dataset_import(dataset.id)
    dataset.refresh_from_db()
    assert (dataset.status, dataset.storage) == (DatasetStatus.READY, "stream")

    settings.DATASET_STATS_STREAM_ROWS = 100
    services.request_dataset_statistics(dataset.id, None, enqueue=False)
    jobs.dataset_statistics(dataset.id)
    dataset.refresh_from_db()
    stats = dataset.statistics
    assert (stats["rows"], stats["complete"]) == (100, False)
    assert stats["chars"]["max"] == max(len(row) for row in rows[:100])
    html = signed_in.get(f"/datasets/{dataset.id}/statistics").content.decode()
    assert "the first 100 rows" in html and "streamed from the Hub" in html


def test_a_failed_measurement_says_why_and_is_not_left_computing(signed_in, corpus):
    _, dataset = corpus
    services.request_dataset_statistics(dataset.id, None, enqueue=False)
    Dataset.objects.filter(pk=dataset.pk).update(file_path=str(dataset.folder / "gone.jsonl"))
    jobs.dataset_statistics(dataset.id)
    dataset.refresh_from_db()
    assert dataset.statistics["state"] == "failed" and dataset.statistics["error"]
    assert dataset.statistics["chars"]["rows"] == 600  # the last good figures stay
    html = signed_in.get(f"/datasets/{dataset.id}/statistics").content.decode()
    assert "The last measurement stopped" in html and "hx-trigger=\"load delay" not in html


def test_a_measurement_whose_job_is_lost_stops_polling_and_says_so(signed_in, corpus, redis_clean):
    from rq.job import Job

    from mistudio.queue import queue

    _, dataset = corpus
    signed_in.post(f"/api/datasets/{dataset.id}/statistics", {}, content_type="application/json")
    dataset.refresh_from_db()
    polling = signed_in.get(f"/datasets/{dataset.id}/statistics").content.decode()
    assert 'hx-trigger="load delay:1s"' in polling  # queued: the tab asks again each second
    Job.fetch(dataset.statistics["asked"]["job_id"], connection=queue().connection).delete()
    html = signed_in.get(f"/datasets/{dataset.id}/statistics").content.decode()
    assert 'hx-trigger="load delay:1s"' not in html and "its job stopped before it finished" in html
    assert "Over every row (600)" in html  # the figures from the import stay
