"""Runs that resume by themselves (issue 17, items 4 and 5): a queued row whose job was lost
(it could not reach the database, or Redis lost it) is found by the workers' maintenance
and queued again, going on from what it kept, while it has attempts left; after that it
fails with a reason. (A worker killed mid-extraction resuming by itself from its checkpoint
is in activations_app/tests/test_resume.py.)"""

import pytest
from django.utils import timezone

from activations_app.models import Dataset
from mistudio import jobs
from models_app import services
from models_app.models import Model, ModelStatus
from models_app.tests.support import run_burst_worker

pytestmark = pytest.mark.django_db(transaction=True)


def lose_its_job(row, minutes=3):
    """Its RQ job gone (as when the job died before reading its row, or Redis lost it), and
    the row queued long enough ago to count as stranded."""
    from rq.job import Job

    from mistudio.queue import queue

    Job.fetch(row.job_id, connection=queue().connection).delete()
    type(row).objects.filter(pk=row.pk).update(updated_at=timezone.now() - timezone.timedelta(minutes=minutes))


def test_a_download_whose_job_was_lost_is_queued_again_by_a_workers_maintenance_and_ends_ready(hub, data_dir, redis_clean):
    model = services.request_download(user=None, repo_id="tiny/llama", quantization="FP32")
    lose_its_job(Model.objects.get(pk=model.pk))
    worker = run_burst_worker(MISTUDIO_JOB_RETRY_BACKOFF="0.1")
    assert worker.returncode == 0, worker.stderr[-3000:]
    done = Model.objects.get(pk=model.pk)
    assert done.status == ModelStatus.READY, (done.status, done.error_message)
    assert done.attempt == 2 and done.notice == "Resumed automatically after its job was lost before it started (attempt 2 of 3)."
    assert "had lost their job" in worker.stdout + worker.stderr


def test_a_stranded_row_out_of_attempts_fails_with_a_reason_and_a_live_or_recent_one_is_left_alone(hub, settings, redis_clean):
    settings.JOB_ATTEMPTS = 2
    out_of_attempts = services.request_download(user=None, repo_id="tiny/llama", quantization="FP32")
    Model.objects.filter(pk=out_of_attempts.pk).update(attempt=2)
    lose_its_job(Model.objects.get(pk=out_of_attempts.pk))
    waiting = services.request_download(user=None, repo_id="tiny/llama", quantization="FP16")  # its job is in the queue
    Model.objects.filter(pk=waiting.pk).update(updated_at=timezone.now() - timezone.timedelta(minutes=10))
    recent = services.request_download(user=None, repo_id="tiny/llama", quantization="Q8")
    lose_its_job(Model.objects.get(pk=recent.pk), minutes=0)  # lost a moment ago: its job may still be on its way
    never_queued = Dataset.objects.create(name="d", source="hub", file_path="", status="queued", job_id="")
    Dataset.objects.filter(pk=never_queued.pk).update(updated_at=timezone.now() - timezone.timedelta(minutes=5))

    assert jobs.reap_stranded() == 1
    failed = Model.objects.get(pk=out_of_attempts.pk)
    assert (failed.status, failed.error_code) == (ModelStatus.ERROR, "job_lost") and "retry" in failed.error_message
    # No job id: a command runs it here (it may be waiting for the database); never handed to a worker.
    inline = Dataset.objects.get(pk=never_queued.pk)
    assert inline.status == "queued" and inline.attempt == 1 and inline.job_id == ""
    assert Model.objects.get(pk=waiting.pk).status == ModelStatus.QUEUED and Model.objects.get(pk=waiting.pk).attempt == 1
    assert Model.objects.get(pk=recent.pk).attempt == 1
    assert jobs.reap_stranded() == 0  # the requeued one has its job now
