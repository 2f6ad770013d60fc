"""The fault sweep, generated from the registered job kinds (mistudio.jobs.register: model
download/import/quantization, dataset import, extraction, export): for each kind, a running
row whose worker dies, with attempts left and without; and a queued row whose job was lost.
Each must end queued again by itself (its card saying so) or failed with a clear code, with
nothing of its job left on disk but what a resume goes on from. A kind registered tomorrow
is swept with no new test. (The same faults on real processes, kill -9 of a work horse or a
whole worker and a Redis outage, are in test_download, test_extraction_api, test_resume,
test_lifecycle and test_redis_outage.)"""

from __future__ import annotations

import pytest
from django.utils import timezone

from mistudio import jobs
from activations_app.tests.test_resume import long_dataset  # noqa: F401 - fixture
from tests.test_action_sweep import every_state  # noqa: F401 - fixture: a real row of every kind

pytestmark = pytest.mark.django_db(transaction=True)


def running_copy(template, job_id: str):
    """A copy of a real row of its kind, running under `job_id`, with every folder its job
    writes holding partial bytes (as a run killed part way leaves them)."""
    cls = type(template)
    row = cls.objects.get(pk=template.pk)
    row.pk = cls._meta.pk.get_default()
    running = next(status for status in cls.RUNNING if status != cls.QUEUED)
    row.status, row.job_id, row.attempt, row.notice, row.error_code = running, job_id, 1, "", ""
    row.save()
    row = cls.rows().get(pk=row.pk)
    for path in row.job_paths():
        path.mkdir(parents=True, exist_ok=True)
        (path / "partial.bin").write_bytes(b"\0" * 1024)
    return row


def left_on_disk(row) -> list:
    kept = row.resume_path
    return [path for path in row.job_paths() if path.exists() and path != kept]


def test_every_job_kind_survives_its_worker_dying_and_its_job_being_lost(every_state, settings, redis_clean):
    kinds = list(jobs._KINDS)
    templates = {}
    for row in every_state["rows"]:
        templates.setdefault(type(row), row)
    assert {cls.__name__ for cls in kinds} <= {cls.__name__ for cls in templates}, "a registered kind has no row to sweep"
    outcomes = []
    for cls in kinds:
        template = templates[cls]
        # Its worker dies with attempts left: queued again by itself, its partial work kept only
        # where a resume goes on from it.
        settings.JOB_ATTEMPTS = 3
        row = running_copy(template, f"dead-{cls.KIND}")
        jobs.mark_worker_died(row.job_id, "signal 9")
        after = cls.rows().get(pk=row.pk)
        assert after.status == cls.QUEUED and after.attempt == 2, (cls.KIND, after.status)
        assert after.notice == "Resumed automatically after its worker stopped (attempt 2 of 3).", (cls.KIND, after.notice)
        assert after.job_id and after.job_id != row.job_id and not left_on_disk(after), (cls.KIND, left_on_disk(after))
        jobs.cancel(cls, after.pk, None)
        assert not [path for path in after.job_paths() if path.exists()], cls.KIND  # a cancel keeps nothing

        # Out of attempts: failed, saying what happened and what to do.
        settings.JOB_ATTEMPTS = 1
        row = running_copy(template, f"dead-again-{cls.KIND}")
        jobs.mark_worker_died(row.job_id, "signal 9")
        after = cls.rows().get(pk=row.pk)
        assert (after.status, after.error_code) == (cls.FAILED, "worker_died"), (cls.KIND, after.status)
        assert "signal 9" in after.error_message and "retry" in after.error_message
        assert not left_on_disk(after), (cls.KIND, left_on_disk(after))

        # Queued, but its job is gone (it could not reach the database; Redis lost it): the
        # workers' maintenance queues it again, or fails it once out of attempts.
        for attempts, expected in ((3, cls.QUEUED), (1, cls.FAILED)):
            settings.JOB_ATTEMPTS = attempts
            row = running_copy(template, f"lost-{attempts}-{cls.KIND}")
            cls.objects.filter(pk=row.pk).update(status=cls.QUEUED, updated_at=timezone.now() - timezone.timedelta(minutes=5))
            jobs.reap_stranded()
            after = cls.rows().get(pk=row.pk)
            assert after.status == expected, (cls.KIND, attempts, after.status)
            if expected == cls.FAILED:
                assert after.error_code == "job_lost" and not left_on_disk(after)
            else:
                jobs.cancel(cls, after.pk, None)
        # Running, but its job is gone from the queue and nothing has written for ten minutes
        # (a final write that never reached the database): found and finished the same way.
        settings.JOB_ATTEMPTS = 1
        row = running_copy(template, f"vanished-{cls.KIND}")
        cls.objects.filter(pk=row.pk).update(updated_at=timezone.now() - timezone.timedelta(minutes=11))
        fresh = running_copy(template, f"vanished-but-recent-{cls.KIND}")  # written to a moment ago: left alone
        jobs.reap_stranded()
        after = cls.rows().get(pk=row.pk)
        assert (after.status, after.error_code) == (cls.FAILED, "job_lost") and not left_on_disk(after), cls.KIND
        assert cls.rows().get(pk=fresh.pk).status == fresh.status, cls.KIND
        jobs.cancel(cls, fresh.pk, None)
        outcomes.append(cls.KIND)
    print(f"\nfault sweep: {len(kinds)} job kinds ({', '.join(outcomes)}) × worker death with and without attempts "
          f"left, and a lost job with and without")  # fmt: skip


def test_a_job_kind_that_forgets_a_required_piece_is_refused_when_it_is_registered():
    from django.core.exceptions import ImproperlyConfigured
    from django.db import models

    class Forgetful(jobs.TrackedRow):
        KIND = "forgetful"
        status = models.CharField(max_length=8)

        class Meta:
            abstract = True
            app_label = "mistudio"

    with pytest.raises(ImproperlyConfigured) as refused:
        jobs.register(Forgetful)
    for piece in ("QUEUED", "DONE", "card_template", "job_function", "job_paths", "progress_event"):
        assert piece in str(refused.value)
    assert Forgetful not in jobs._KINDS


def test_a_run_taken_for_dead_stops_at_its_next_write_and_leaves_the_new_run_alone(tiny_model, long_dataset, settings):  # noqa: F811
    """A job still alive when its row was queued again (another worker's maintenance took it for
    dead during a long Redis outage): its next write finds a row that is no longer its own,
    and it stops there without failing that row or removing the files the new run goes on from."""
    import threading

    from django.db import connection

    from activations_app import jobs as extraction_jobs
    from activations_app import services as extraction_services
    from activations_app.models import Extraction
    from mistudio.staging import staged_path
    from models_app.tests.support import wait_for

    settings.EXTRACTION_CHECKPOINT_SECONDS = 0.0
    extraction = extraction_services.request_extraction(model_id=tiny_model.id, dataset_id=long_dataset["id"], enqueue=False,
                                                        layers=[3], hook_types=["residual"], max_samples=1600, batch_size=8,
                                                        seq_len=48)  # fmt: skip
    ended = {}

    def run():
        try:
            ended["row"] = extraction_jobs.run_extraction_job(extraction.id)
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: Extraction.objects.get(pk=extraction.id).resumable_rows >= 16, timeout=120, message="a checkpoint")
    Extraction.objects.filter(pk=extraction.id).update(status="queued", job_id="the-new-run", attempt=2)  # as resume_by_itself does
    thread.join(timeout=60)
    assert not thread.is_alive() and ended["row"] is None
    row = Extraction.objects.get(pk=extraction.id)
    assert (row.status, row.job_id, row.error_code) == ("queued", "the-new-run", "")
    assert (staged_path(row.final_dir) / "checkpoint.npz").is_file()  # what the new run goes on from
