"""Orphans keep their identity (issue 19, item 7): an extraction whose model and dataset were
deleted still says what it was made from (repo, revision, format; the dataset's name), and
the dataset's delete confirm names the extractions that stay, as the model's does."""

from __future__ import annotations

import html

import pytest

from activations_app import jobs, services
from activations_app.models import Extraction
from models_app import services as model_services

pytestmark = pytest.mark.django_db(transaction=True)


def test_an_extraction_of_deleted_inputs_still_names_them_and_the_dataset_confirm_names_its_extractions(tiny_model, data_dir, signed_in):
    (data_dir / "imports" / "notes.txt").write_text("\n".join(f"Note {i} about the weather." for i in range(30)))
    dataset = services.import_dataset(path=str(data_dir / "imports" / "notes.txt"), name="weather notes")
    extraction = services.request_extraction(model_id=tiny_model.id, dataset_id=dataset.id, enqueue=False, layers=[0],
                                             hook_types=["residual"], max_samples=4, batch_size=4, seq_len=8)  # fmt: skip
    jobs.run_extraction_job(extraction.id)
    confirm = html.unescape(signed_in.get("/datasets/").content.decode())
    assert f"Delete weather notes and its files? Its 1 extraction stays: {extraction.id}." in confirm
    expected = f"{tiny_model.repo_id or tiny_model.name}{'@' + tiny_model.revision[:7] if tiny_model.revision else ''} FP32"
    model_services.delete_model(tiny_model.id, None)
    services.delete_dataset(dataset.id, None)
    row = Extraction.objects.get(pk=extraction.id)
    assert row.model_id is None and row.dataset_id is None and row.status == "completed"
    for page in (f"/extractions/{row.id}", "/extractions/"):
        text = html.unescape(signed_in.get(page).content.decode())
        assert f"{expected} (model deleted)" in text and "weather notes (dataset deleted)" in text, page
