"""An export never deletes what it did not make: `--out` must be new or empty and lie
outside the extraction's folder, staging is a folder this run created, and the only folder
an export replaces is its own default one inside the extraction."""

import json
import os

import numpy as np
import pytest
from django.core.management import CommandError, call_command

from activations_app import jobs, services
from activations_app.ml import export
from activations_app.models import Extraction, ExtractionStatus
from mistudio.errors import JobError

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def finished(smollm2_model, data_dir, capsys):
    path = data_dir / "imports" / "lines.txt"
    path.write_text("\n".join(f"Sentence number {i} about rivers and bridges." for i in range(40)))
    call_command("import_dataset", str(path), "--json")
    dataset = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    extraction = services.request_extraction(model_id=smollm2_model.id, dataset_id=dataset["id"], enqueue=False,
                                             layers=[0], hook_types=["residual"], max_samples=8, batch_size=8, seq_len=8)  # fmt: skip
    jobs.run_extraction_job(extraction.id)
    extraction.refresh_from_db()
    assert extraction.status == ExtractionStatus.COMPLETED, extraction.error_message
    return extraction


def run_export(extraction_id, out=None):
    """An export as the command runs it: its record, then its job here."""
    record = services.export_extraction(extraction_id, None, "saelens", enqueue=False, out=out)
    return jobs.run_export_job(record.id)


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(extraction_id, out, code):
    with pytest.raises(CommandError) as caught:
        call_command("export_activations", extraction_id, "--out", str(out))
    assert f"[{code}]" in str(caught.value)
    return str(caught.value)


def test_an_export_never_replaces_or_deletes_a_folder_it_did_not_make(finished, tmp_path, monkeypatch, capsys):
    own = finished.final_dir
    before = snapshot(own)

    # A folder holding a user's file is refused, and the file is still there.
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    message = refused(finished.id, theirs, "out_dir_not_empty")
    assert "not empty" in message and (theirs / "notes.txt").read_text() == "keep me"

    # `--out .` in a working directory with files in it: refused, nothing touched.
    monkeypatch.chdir(theirs)
    refused(finished.id, ".", "out_dir_not_empty")
    assert (theirs / "notes.txt").read_text() == "keep me"

    # The extraction's own folder, or a new folder inside it: refused, every file intact.
    refused(finished.id, own, "invalid_out_dir")
    refused(finished.id, own / "mine", "invalid_out_dir")
    assert snapshot(own) == before and not (own / "mine").exists()
    assert Extraction.objects.get(pk=finished.id).status == ExtractionStatus.COMPLETED

    # A file where the folder should be: refused, the file intact.
    a_file = tmp_path / "a_file"
    a_file.write_text("data")
    refused(finished.id, a_file, "invalid_out_dir")
    assert a_file.read_text() == "data"

    # A new folder (its parents made) and an empty one are written, with nothing staged left.
    for out in (tmp_path / "new" / "deeper", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        call_command("export_activations", finished.id, "--out", str(out))
        assert (out / "model.layers.0" / "dataset_info.json").is_file() and (out / "export.json").is_file()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    capsys.readouterr()

    # A second export into the folder the first one filled is refused like any other.
    refused(finished.id, tmp_path / "empty", "out_dir_not_empty")
    assert snapshot(own) == before


def test_the_default_folder_is_replaced_by_a_newer_export_and_staging_is_never_shared(finished, tmp_path):
    default = finished.final_dir / "saelens"
    run_export(finished.id)
    first = (default / "export.json").read_text()
    (default / "stale.txt").write_text("from the first export")  # the app's own folder: a re-export replaces it
    run_export(finished.id)
    assert (default / "export.json").read_text() == first and not (default / "stale.txt").exists()
    assert sorted(p.name for p in finished.final_dir.iterdir() if p.name.startswith(".")) == []

    # Someone else's staging folder beside the target (another export running) is left alone.
    other = tmp_path / ".out.partial-someone"
    other.mkdir()
    (other / "half.arrow").write_bytes(b"x")
    run_export(finished.id, out=tmp_path / "out")
    assert (other / "half.arrow").read_bytes() == b"x" and (tmp_path / "out" / "export.json").is_file()


def test_a_folder_filled_while_the_export_ran_is_left_as_it_is(finished, tmp_path, monkeypatch):
    out = tmp_path / "exports" / "out"
    real_rename = os.rename

    def someone_writes_first(src, dst):
        if str(dst) == str(out):
            out.mkdir(exist_ok=True)
            (out / "theirs.npy").write_bytes(np.arange(3).tobytes())
        return real_rename(src, dst)

    monkeypatch.setattr(export.os, "rename", someone_writes_first)
    with pytest.raises(JobError) as caught:
        run_export(finished.id, out=out)
    assert caught.value.code == "out_dir_not_empty"
    assert [p.name for p in out.iterdir()] == ["theirs.npy"]
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # the staging folder it made is gone, nothing else
