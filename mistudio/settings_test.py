"""Settings for the test suite: the real services on this machine, isolated from a
development setup (Redis DB 15, its own channel prefix, a throwaway data dir).
Subprocesses started by tests (RQ workers, daphne) inherit these through the environment."""

import os
import tempfile

# Under pytest-xdist each worker (gw0, gw1, …) gets its own Redis DB (15, 14, …) and channel
# prefix; pytest-django gives each its own test database (test_…_gw0).
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
WORKER_INDEX = int(WORKER[2:]) if WORKER.startswith("gw") and WORKER[2:].isdigit() else 0

for name, value in {
    "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/postgres",
    "REDIS_URL": f"redis://127.0.0.1:6379/{15 - WORKER_INDEX}",
    "MISTUDIO_CHANNEL_PREFIX": f"mistudio-test{WORKER and '-' + WORKER}",
    "SECRET_KEY": "insecure-test-only-key-0123456789abcdefghijklmnopqrstuvwxyz",
    "MISTUDIO_HUB_RETRY_BACKOFF": "0.05",
    "MISTUDIO_DISK_RESERVE_BYTES": "0",
    # Perplexity over the reference text's first 256 tokens instead of all ~2,300: the same
    # comparisons (Q4 above FP32, Q8 near it) at a ninth of the forward passes.
    "MISTUDIO_PERPLEXITY_TOKENS": "256",
}.items():
    if WORKER and name in ("REDIS_URL", "MISTUDIO_CHANNEL_PREFIX") and not os.environ.get("MISTUDIO_TEST_OWN_REDIS"):
        # A shared one would let the workers flush each other's queues. A subprocess that a test
        # points at a Redis of its own (MISTUDIO_TEST_OWN_REDIS, the outage test) keeps it.
        os.environ[name] = value
    os.environ.setdefault(name, value)
os.environ.setdefault("MISTUDIO_DATA_DIR", tempfile.mkdtemp(prefix="mistudio-test-"))

from .settings import *  # noqa: E402,F403
