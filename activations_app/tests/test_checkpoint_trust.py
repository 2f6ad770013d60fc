"""A checkpoint is validated before it is trusted (issue 17, item 8): a stopped run's
checkpoint whose row count, statistics or files do not match what its rows must hold is
not gone on from; the run starts over, says why on its row, and ends with the same files
as an uninterrupted run."""

import numpy as np
import pytest

from activations_app import jobs, services
from activations_app.models import Extraction, ExtractionStatus
from activations_app.tests.test_resume import long_dataset, output_files, stop_inline_run_keeping  # noqa: F401 - fixture
from mistudio.staging import staged_path

pytestmark = pytest.mark.django_db(transaction=True)

REQUEST = dict(layers=[1, 3], hook_types=["residual", "mlp"], max_samples=160, batch_size=8, seq_len=48)


def stopped_part_way(model_id, dataset_id):
    """A real run of the tiny model, stopped (keep for Resume) once its checkpoint holds rows."""
    extraction = services.request_extraction(model_id=model_id, dataset_id=dataset_id, enqueue=False, **REQUEST)
    stopped = stop_inline_run_keeping(extraction.id, lambda row: row.resumable_rows >= 16)
    assert stopped.status == ExtractionStatus.CANCELLED and stopped.resumable_rows >= 16
    return stopped


def tamper(extraction, change) -> None:
    path = staged_path(extraction.final_dir) / "checkpoint.npz"
    with np.load(path, allow_pickle=False) as saved:
        arrays = {key: saved[key] for key in saved.files}
    change(arrays)
    with path.open("wb") as handle:
        np.savez(handle, **arrays)


def first_stats_key(arrays, name):
    return next(key for key in arrays if key.endswith("/" + name))


TAMPERINGS = {
    "rows 10^9": (lambda a: a.update(__rows__=np.int64(10**9)), "names 1,000,000,000 rows"),
    "rows -5": (lambda a: a.update(__rows__=np.int64(-5)), "names -5 rows"),
    "token count": (lambda a: a.update({first_stats_key(a, "tokens"): np.int64(3)}), "count 3 tokens"),
    "garbage statistics": (lambda a: a.update({first_stats_key(a, "dim_mean"): np.array(["garbage"])}), "statistics of"),
    "statistics missing": (lambda a: a.pop(first_stats_key(a, "norm_hist")), "lack norm_hist"),
    "threshold garbage": (lambda a: a.update({first_stats_key(a, "threshold"): np.array("x")}), "are not numbers"),
    "negative NaN count": (lambda a: a.update({first_stats_key(a, "nan"): np.int64(-3)}), "do not add up"),
}


def test_a_genuine_checkpoint_is_gone_on_from_and_a_tampered_one_is_not(tiny_model, long_dataset, settings, signed_in, redis_clean):  # noqa: F811
    import shutil

    settings.EXTRACTION_CHECKPOINT_SECONDS = 0.0
    clean = run_to_end(tiny_model.id, long_dataset["id"])
    stopped = stopped_part_way(tiny_model.id, long_dataset["id"])
    staged, kept = staged_path(stopped.final_dir), stopped.resumable_rows
    pristine = staged.with_name("pristine-checkpoint")
    shutil.copytree(staged, pristine)
    # Untouched: resumed from its rows, no word of a restart, the same files as the clean run.
    resumed = resume_inline(stopped)
    assert resumed.status == ExtractionStatus.COMPLETED and resumed.notice == "", resumed.notice
    assert resumed.samples_done == REQUEST["max_samples"] and kept > 0
    assert output_files(resumed.final_dir) == clean
    for name, (change, reason) in TAMPERINGS.items():
        # The same stopped run again, its checkpoint changed.
        shutil.rmtree(stopped.final_dir, ignore_errors=True)
        shutil.copytree(pristine, staged)
        Extraction.objects.filter(pk=stopped.pk).update(status=ExtractionStatus.CANCELLED, error_code="stopped_kept", notice="")
        tamper(stopped, change)
        finished = resume_inline(stopped)
        assert finished.status == ExtractionStatus.COMPLETED, (name, finished.error_message)
        assert finished.notice.startswith("Started over: its checkpoint was not trusted"), (name, finished.notice)
        assert reason in finished.notice, (name, finished.notice)
        assert output_files(finished.final_dir) == clean, name  # no row of zeros, no wrong statistics
        assert "Started over" in signed_in.get(f"/extractions/{finished.id}").content.decode(), name
        assert signed_in.get(f"/api/extractions/{finished.id}").json()["notice"] == finished.notice
    shutil.rmtree(pristine)


def run_to_end(model_id, dataset_id) -> dict[str, bytes]:
    """The files of an uninterrupted run; the run itself is deleted, so that the run under
    test computes its own instead of reusing these."""
    done = services.request_extraction(model_id=model_id, dataset_id=dataset_id, enqueue=False, **REQUEST)
    jobs.run_extraction_job(done.id)
    files = output_files(Extraction.objects.get(pk=done.id).final_dir)
    services.delete_extraction(done.id, None)
    return files


def resume_inline(extraction):
    from mistudio import jobs as tracked

    tracked.resume(Extraction, extraction.id, None, enqueue=False)
    jobs.run_extraction_job(extraction.id)
    return Extraction.objects.get(pk=extraction.id)
