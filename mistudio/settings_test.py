"""Settings for the test suite: the real services on this machine, isolated from a
development setup (Redis DB 15, its own channel prefix, a throwaway data dir).
Subprocesses started by tests (RQ workers, daphne) inherit these through the environment."""

import os
import tempfile

for name, value in {
    "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/postgres",
    "REDIS_URL": "redis://127.0.0.1:6379/15",
    "MISTUDIO_CHANNEL_PREFIX": "mistudio-test",
    "SECRET_KEY": "insecure-test-only-key-0123456789abcdefghijklmnopqrstuvwxyz",
    "MISTUDIO_HUB_RETRY_BACKOFF": "0.05",
    "MISTUDIO_DISK_RESERVE_BYTES": "0",
}.items():
    os.environ.setdefault(name, value)
os.environ.setdefault("MISTUDIO_DATA_DIR", tempfile.mkdtemp(prefix="mistudio-test-"))

from .settings import *  # noqa: E402,F403
