"""Fixtures shared by every app's tests: an isolated data dir, clean Redis, users, and a
loopback Hub serving real model files."""

from __future__ import annotations

import os
from pathlib import Path

import django_rq
import pytest

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from models_app.tests import support  # noqa: E402
from models_app.tests.hub_server import VALID_UNGATED_TOKEN, HubRepo, HubServer, make_sha  # noqa: E402

GATED_TOKEN = "hf_granted_token_for_tests"


@pytest.fixture(scope="session")
def stack_data_root(tmp_path_factory) -> Path:
    """The data dir of the web server and worker a browser test module shares (`stack`)."""
    return tmp_path_factory.mktemp("stack-data")


@pytest.fixture(autouse=True)
def data_dir(settings, tmp_path, request) -> Path:
    """Every test gets its own data dir and import root; a test on the shared server and
    worker gets theirs, emptied first."""
    import shutil

    if "stack" in request.fixturenames:
        root = request.getfixturevalue("stack_data_root")
        for child in root.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    else:
        root = tmp_path / "data"
    (root / "imports").mkdir(parents=True, exist_ok=True)
    settings.DATA_DIR = root
    settings.IMPORT_ROOTS = [(root / "imports").resolve()]
    return root


@pytest.fixture(scope="session", autouse=True)
def no_connection_outlives_the_session(django_db_setup, django_db_blocker):
    """Async tests reach the database through database_sync_to_async, whose executor thread
    keeps its connection open; end those (and any a killed subprocess left) before
    pytest-django drops the test database, which PostgreSQL refuses while they exist."""
    yield
    from django.db import connection

    with django_db_blocker.unblock():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
        connection.close()


@pytest.fixture
def redis_clean():
    """An empty test Redis DB (queue, job records and channel layer)."""
    connection = django_rq.get_queue("default").connection
    connection.flushdb()
    yield connection
    connection.flushdb()


@pytest.fixture(scope="session")
def tiny_repo_folder(tmp_path_factory) -> Path:
    return support.write_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    return support.smollm2_folder()


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory, tiny_repo_folder):
    """The loopback Hub, serving: tiny/llama (public), tiny/llama-mlp (public, Linear-heavy),
    tiny/gated (gated, one token has access), google/bert-tiny (encoder-only). SmolLM2 is
    added by the smollm2 fixture."""
    server = HubServer()
    server.add_repo(HubRepo("tiny/llama", tiny_repo_folder, make_sha("tiny/llama")))
    server.add_repo(
        HubRepo("tiny/gated", tiny_repo_folder, make_sha("tiny/gated"), gated=True, allowed_tokens=frozenset({GATED_TOKEN}))
    )
    # Most of its parameters are in Linear layers, so each quantized format is smaller than
    # the one before (in tiny/llama the float embeddings dominate and Q8 outweighs FP16).
    mlp_heavy = support.write_tiny_model(
        tmp_path_factory.mktemp("tiny-mlp"), vocab_size=256, intermediate_size=512, tie_word_embeddings=True
    )
    server.add_repo(HubRepo("tiny/llama-mlp", mlp_heavy, make_sha("tiny/llama-mlp")))
    bert = support.write_encoder_only_repo(tmp_path_factory.mktemp("bert"))
    server.add_repo(HubRepo("google/bert-tiny", bert, make_sha("google/bert-tiny")))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def hub(hub_server, settings, redis_clean):
    """The loopback Hub as HF_ENDPOINT, its request log cleared, at full speed."""
    settings.HF_ENDPOINT = hub_server.endpoint
    hub_server.clear_log()
    hub_server.bytes_per_second = None
    hub_server.fail_next_requests = 0
    hub_server.damage_next_downloads.clear()
    yield hub_server
    hub_server.bytes_per_second = None
    hub_server.fail_next_requests = 0
    hub_server.damage_next_downloads.clear()


@pytest.fixture
def hub_with_smollm2(hub, smollm2_folder):
    repo_id = "HuggingFaceTB/SmolLM2-135M"
    hub.add_repo(HubRepo(repo_id, smollm2_folder, make_sha(repo_id)))
    return hub


@pytest.fixture
def smollm2_model(smollm2_folder, data_dir):
    """A ready FP32 SmolLM2 record whose snapshot is the machine's cached build (linked,
    not downloaded again: the download path has tests of its own)."""
    return ready_model_record(smollm2_folder, "SmolLM2-135M")


@pytest.fixture(scope="session")
def tiny_smollm2_folder() -> Path:
    return support.tiny_smollm2_folder()


@pytest.fixture
def tiny_model(tiny_smollm2_folder, data_dir):
    """A ready FP32 record of SmolLM2's family at a tiny size (random weights, the real
    tokenizer): for tests where the code path matters and the values do not."""
    return ready_model_record(tiny_smollm2_folder, "SmolLM2-tiny")


def ready_model_record(folder: Path, name: str):
    import json

    from models_app.models import Model
    from models_app.ml.loading import count_parameters

    config = json.loads((folder / "config.json").read_text())
    model = Model.objects.create(name=name, status="ready", architecture=config["model_type"], architecture_config=config,
                                 params_count=count_parameters(config), quantization="FP32")  # fmt: skip
    model.raw_dir.parent.mkdir(parents=True, exist_ok=True)
    model.raw_dir.symlink_to(folder)
    return model


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user("researcher", password="correct horse battery")


@pytest.fixture
def outsider_client(client):
    """A client that never signed in."""
    return client


@pytest.fixture
def signed_in(client, user):
    client.force_login(user)
    return client


__all__ = ["GATED_TOKEN", "VALID_UNGATED_TOKEN"]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on the test item, for fixtures that act on a failure (the
    browser fixture's screenshots)."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


# What `scripts/test --quick` leaves out: a test that drives the browser, starts a worker or
# web server subprocess, or loads real weights (the SmolLM2 fixtures), found from the
# fixtures it asks for and the helpers its code calls, not from a list of names.
HEAVY_FIXTURES = {"stack", "browser", "smollm2_model", "smollm2_folder", "hub_with_smollm2"}
HEAVY_CALLS = ("start_worker(", "run_burst_worker(", "start_web(", "start_daphne(", "smollm2", "subprocess.")


def _source(func) -> str:
    import inspect

    try:
        return inspect.getsource(func)
    except (OSError, TypeError):
        return ""


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        info = getattr(item, "_fixtureinfo", None)
        fixtures = [d.func for defs in (info.name2fixturedefs.values() if info else ()) for d in defs]
        sources = [_source(getattr(item, "function", None))] + [_source(func) for func in fixtures]
        if HEAVY_FIXTURES & names or any(call in source for source in sources for call in HEAVY_CALLS):
            item.add_marker(pytest.mark.heavy)
    # The long tests first (a stable sort: a module's tests stay together): the quick ones
    # then fill both xdist workers to the end instead of one long test running alone.
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)
