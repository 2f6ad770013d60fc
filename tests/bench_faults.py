"""The fault sweep on real processes (issue 17), in scripts/bench because each case takes
tens of seconds: for the job kinds a slow enough run is easy to make here (a model download
and a dataset import from the throttled loopback Hub, an extraction of SmolLM2's tiny
sibling over 1,600 windows, an export of a 1,600-window extraction over 12 layer/hook files, SmolLM2-135M made Q8),
each fault is applied part way through on a real worker:
kill -9 of its work horse, kill -9 of its whole worker (a second worker finds the job once
its heartbeat lapses), Redis stopped for 20 s, and the database refusing every new
connection for 10 s. Each run must end completed within 2 minutes of the fault being noticed (by itself: resumed
automatically, or ridden out) with nothing orphaned beside its finished files, and the
table says how long each took. The same kinds, and every kind registered, are also swept
in-process in the suite (tests/test_fault_sweep.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from django.db import connection

from activations_app import services as extraction_services
from activations_app.models import Dataset, Export, Extraction
from activations_app.tests.test_resume import TEXT
from models_app.models import Model
from models_app.tests.bench_models import report
from models_app.tests.hub_server import HubRepo, make_sha
from models_app.tests.support import ROOT, start_worker, stop, subprocess_env, wait_for
from tests.test_redis_outage import PrivateRedis

pytestmark = pytest.mark.django_db(transaction=True)
ROLE = "mistudio_fault_bench"


def queued_by_command(*args, env) -> dict:
    """A job queued as a user queues it at the shell (onto the bench's own Redis); its record."""
    done = subprocess.run([sys.executable, "manage.py", *args, "--json"], cwd=ROOT, env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def slow_download(hub, tmp_path, data_dir, env, model):
    hub.bytes_per_second = 150_000  # the ~1.4 MB weights take ~9 s
    return Model.objects.get(pk=queued_by_command("download_model", "tiny/llama", "--quantization", "FP32", env=env)["id"])


def slow_dataset_import(hub, tmp_path, data_dir, env, model):
    repo = tmp_path / "corpus"
    (repo / "data").mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"text": f"line {i} of a corpus with some words in it"}) + "\n" for i in range(40_000))
    (repo / "data" / "train-00000-of-00001.jsonl").write_text(lines)
    hub.add_repo(HubRepo("corpora/faults", repo, make_sha("corpora/faults"), repo_type="dataset"))
    hub.bytes_per_second = 200_000  # ~2 MB: ~10 s
    return Dataset.objects.get(pk=queued_by_command("import_dataset", "corpora/faults", "--download-whole", env=env)["id"])


def slow_extraction(hub, tmp_path, data_dir, env, model):
    (data_dir / "imports" / "long.txt").write_text("\n".join([TEXT] * 8))
    dataset = extraction_services.import_dataset(path=str(data_dir / "imports" / "long.txt"))
    record = queued_by_command("extract_activations", model.id, "--dataset", dataset.id, "--layers", "0,1,2,3",
                               "--hooks", "residual,mlp,attention", "--max-samples", "1600", "--batch-size", "8",
                               "--seq-len", "48", env=env)  # fmt: skip
    return Extraction.objects.get(pk=record["id"])


def slow_export(hub, tmp_path, data_dir, env, model):
    """An export of a 1,600-window extraction over 4 layers × 3 hooks (12 datasets)."""
    from activations_app import jobs as extraction_jobs

    (data_dir / "imports" / "long.txt").write_text("\n".join([TEXT] * 8))
    dataset = extraction_services.import_dataset(path=str(data_dir / "imports" / "long.txt"))
    done = extraction_services.request_extraction(model_id=model.id, dataset_id=dataset.id, layers=[0, 1, 2, 3], enqueue=False,
                                                  hook_types=["residual", "mlp", "attention"], max_samples=1600,
                                                  batch_size=8, seq_len=48)  # fmt: skip
    extraction_jobs.run_extraction_job(done.id)  # here: the worker is for the export
    return Export.objects.get(pk=queued_by_command("export_activations", done.id, "--queue", env=env)["id"])


def slow_quantization(hub, tmp_path, data_dir, env, model):
    """SmolLM2-135M's own weights made Q8 (then its perplexity measured)."""
    from conftest import ready_model_record
    from models_app.tests.support import smollm2_folder

    source = ready_model_record(smollm2_folder(), "SmolLM2-135M")
    return Model.objects.get(pk=queued_by_command("quantize_model", source.id, "--quantization", "Q8", env=env)["id"])


def started(row) -> bool:
    row.refresh_from_db()
    return row.status != row.QUEUED and row.progress > 0


def kill_horse(worker, redis, env):
    subprocess.run(["pkill", "-KILL", "-P", str(worker.pid)], check=True)


def kill_worker(worker, redis, env):
    """kill -9 of the worker and its horse together (a container kill): nobody is left to say
    so; another worker's maintenance finds the job once its heartbeat has lapsed (61 s with a
    heartbeat every second) and it resumes by itself there. The new worker is returned."""
    horses = subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True, text=True).stdout.split()
    worker.kill()
    if horses:
        subprocess.run(["kill", "-KILL", *horses], check=False)
    worker.wait(timeout=30)
    time.sleep(62)
    return start_worker(burst=False, log_file=True, DATABASE_URL=env["DATABASE_URL"],
                        **{k: v for k, v in env.items() if k != "DATABASE_URL"})  # fmt: skip


def stop_redis(worker, redis, env):
    redis.stop()
    time.sleep(20)
    redis.start()


def refuse_connections(worker, redis, env):
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER ROLE {ROLE} CONNECTION LIMIT 0")
    time.sleep(10)
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER ROLE {ROLE} CONNECTION LIMIT -1")


@pytest.fixture
def fault_role():
    db = connection.settings_dict
    with connection.cursor() as cursor:
        cursor.execute(f"DROP ROLE IF EXISTS {ROLE}")
        cursor.execute(f"CREATE ROLE {ROLE} LOGIN")
        cursor.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {ROLE}")
        cursor.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {ROLE}")
    yield f"postgres://{ROLE}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [ROLE])
        cursor.execute(f"REASSIGN OWNED BY {ROLE} TO CURRENT_USER")
        cursor.execute(f"DROP OWNED BY {ROLE}")
        cursor.execute(f"DROP ROLE IF EXISTS {ROLE}")


KINDS = {"model download": slow_download, "dataset import": slow_dataset_import, "extraction": slow_extraction,
         "export": slow_export, "quantization": slow_quantization}  # fmt: skip
FAULTS = {"kill -9 of its work horse": kill_horse, "kill -9 of its whole worker": kill_worker, "Redis stopped for 20 s": stop_redis,
          "new database connections refused for 10 s": refuse_connections}  # fmt: skip


@pytest.mark.timeout(1800)
def test_every_fault_on_a_real_worker_ends_in_a_finished_run(hub, tiny_model, data_dir, tmp_path, fault_role, settings):
    rows, problems = [], []
    chosen = [k.strip() for k in os.environ.get("MISTUDIO_FAULT_KINDS", "").split(",") if k.strip()]  # a rerun of some
    for kind, make in KINDS.items():
        if chosen and kind not in chosen:
            continue
        for fault, apply in FAULTS.items():
            redis = PrivateRedis(tmp_path)
            redis.start()
            env = {"REDIS_URL": redis.url, "MISTUDIO_TEST_OWN_REDIS": "1", "MISTUDIO_JOB_MONITORING_SECONDS": "1",
                   "MISTUDIO_JOB_RETRY_BACKOFF": "1", "MISTUDIO_CHECKPOINT_SECONDS": "1"}  # fmt: skip
            env["DATABASE_URL"] = fault_role
            worker = start_worker(burst=False, log_file=True, **env)
            begun = time.monotonic()
            try:
                row = make(hub, tmp_path, data_dir, env, tiny_model)
                wait_for(lambda row=row: started(row), timeout=120, message=f"{kind} under way")
                worker = apply(worker, redis, env) or worker
                hub.bytes_per_second = None
                wait_for(lambda row=row: (row.refresh_from_db() or not row.is_running), timeout=150, message=f"{kind} ends")
                seconds = time.monotonic() - begun
                row.refresh_from_db()
                leftovers = [str(p) for p in row.job_paths() if p.exists() and p.name.endswith(".partial")]
                limit = 120 + (62 if apply is kill_worker else 0)  # the heartbeat's lapse is waited out above
                ok = row.is_ready and not leftovers and seconds < limit
                rows.append((f"{kind}, {fault}", f"{row.status:<10} attempt {row.attempt}  {seconds:5.1f} s  {row.notice or ''}"))
                if not ok:
                    problems.append(f"{kind}, {fault}: {row.status} {row.error_code} {row.error_message} {leftovers}")
            except Exception as exc:  # noqa: BLE001 - reported per case
                problems.append(f"{kind}, {fault}: {type(exc).__name__}: {exc}")
                rows.append((f"{kind}, {fault}", f"FAILED: {type(exc).__name__}"))
            finally:
                stop(worker, timeout=20)
                redis.stop()
                for model in (Export, Extraction, Dataset, Model):
                    model.objects.exclude(pk=tiny_model.pk).delete() if model is Model else model.objects.all().delete()
    report("Faults on a real worker, part way through each kind of job (must end completed within 2 min, nothing left over)",
           rows + [("target", "every case completed, < 120 s, no staged folder left")])  # fmt: skip
    assert not problems, "\n".join(problems)
