"""A job that cannot reach the database waits for it instead of failing before any error
handling (issue 17, item 5): with the worker's database role allowed no connection at all
(as when every connection is held elsewhere), a queued download's job waits, with backoff,
and once connections are allowed again it runs to the end; the worker itself lives on."""

import time

import pytest
from django.db import connection

from models_app import services
from models_app.models import Model, ModelStatus
from models_app.tests.support import start_worker, stop, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

ROLE = "mistudio_limited_test"


@pytest.fixture
def limited_role():
    """A login role with every right on the test database, allowed no connection for now."""
    with connection.cursor() as cursor:
        cursor.execute(f"DROP ROLE IF EXISTS {ROLE}")  # a run that was killed may have left it
        cursor.execute(f"CREATE ROLE {ROLE} LOGIN CONNECTION LIMIT 0")
        cursor.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {ROLE}")
        cursor.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {ROLE}")
        cursor.execute(f"GRANT CONNECT ON DATABASE {connection.settings_dict['NAME']} TO {ROLE}")
    yield ROLE
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER ROLE {ROLE} CONNECTION LIMIT -1")
        cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [ROLE])
        cursor.execute(f"REASSIGN OWNED BY {ROLE} TO CURRENT_USER")
        cursor.execute(f"DROP OWNED BY {ROLE}")
        cursor.execute(f"DROP ROLE IF EXISTS {ROLE}")


def test_a_job_waits_for_a_database_that_refuses_connections_and_then_runs(hub, data_dir, limited_role, redis_clean):
    model = services.request_download(user=None, repo_id="tiny/llama", quantization="FP32")
    db = connection.settings_dict
    url = f"postgres://{limited_role}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    worker = start_worker(burst=False, log_file=True, DATABASE_URL=url)
    try:
        wait_for(lambda: "the database refused the job" in open(worker.log_path).read(), timeout=60, message="the job waiting")
        time.sleep(2)
        assert Model.objects.get(pk=model.pk).status == ModelStatus.QUEUED and worker.poll() is None
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER ROLE {limited_role} CONNECTION LIMIT -1")  # connections free again
        wait_for(lambda: not Model.objects.get(pk=model.pk).is_running, timeout=90, message="the download's end")
        done = Model.objects.get(pk=model.pk)
        assert done.status == ModelStatus.READY, (done.status, done.error_message)
        assert worker.poll() is None
    finally:
        stop(worker)
