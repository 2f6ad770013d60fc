"""Settings, all from environment variables with safe defaults.

Nothing here needs editing to run on a new machine: the data dir, a SECRET_KEY kept in
it, SQLite in it and Redis on localhost are the defaults.
"""

import os
import re
import secrets
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def env_list(name: str, default: list[str]) -> list[str]:
    value = os.environ.get(name)
    if value is None:
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


def database_from_url(url: str, sqlite_path: Path) -> dict:
    """A Django DATABASES entry from DATABASE_URL (postgres://…), or SQLite in the data dir."""
    if not url:
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": str(sqlite_path)}
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": unquote(parts.path) or str(sqlite_path)}
    if parts.scheme not in {"postgres", "postgresql"}:
        raise ValueError(f"DATABASE_URL scheme {parts.scheme!r} is not supported (use postgres:// or sqlite://)")
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parts.path.lstrip("/")) or "postgres",
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
        **connection_reuse(),
    }


def connection_reuse() -> dict:
    """How a process keeps its PostgreSQL connections.

    The ASGI server (mistudio/asgi.py sets MISTUDIO_DB_POOL) runs each request's sync code
    in a thread of its own, so a per-thread persistent connection is left behind by every
    request: Django's psycopg pool bounds them instead (at most MISTUDIO_DB_POOL_SIZE per web
    process; by default 32 shared out over the MISTUDIO_WEB_PROCESSES, at least 4 each). RQ workers, whose jobs fork from them, never pool (a pool's threads and shared
    sockets do not survive a fork); they and the commands keep one connection for a minute."""
    if env_bool("MISTUDIO_DB_POOL", False) and "rqworker" not in sys.argv:
        size = env_int("MISTUDIO_DB_POOL_SIZE", max(4, 32 // max(1, env_int("MISTUDIO_WEB_PROCESSES", 1))))
        pool = {"min_size": 2, "max_size": size, "timeout": 10}
        return {"CONN_MAX_AGE": 0, "OPTIONS": {"pool": pool}}
    return {"CONN_MAX_AGE": 60, "CONN_HEALTH_CHECKS": True}


def persistent_secret_key(data_dir: Path) -> str:
    """SECRET_KEY from the environment, else generated once and kept (mode 600) in the data dir."""
    given = os.environ.get("SECRET_KEY") or os.environ.get("DJANGO_SECRET_KEY")
    if given:
        return given
    key_file = data_dir / "secret_key"
    if not key_file.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(50))
    return key_file.read_text().strip()


DATA_DIR = Path(env_str("MISTUDIO_DATA_DIR", str(BASE_DIR / "data"))).resolve()
DATA_DIR.mkdir(parents=True, exist_ok=True)

SECRET_KEY = persistent_secret_key(DATA_DIR)
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "channels",
    "django_rq",
    "django_htmx",
    "mistudio",
    "models_app",
    "activations_app",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "mistudio.hardening.RefuseOversizedBody",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "mistudio.hardening.RefuseUnstorableText",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "mistudio.auth.ApiTokenMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "mistudio.hardening.AnswerOnce",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "mistudio.auth.LoginRequiredMiddleware",
]

ROOT_URLCONF = "mistudio.urls"
ASGI_APPLICATION = "mistudio.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "mistudio.context_processors.compute_device",
                "mistudio.context_processors.tabs",
            ],
        },
    },
]

DATABASES = {"default": database_from_url(env_str("DATABASE_URL"), DATA_DIR / "mistudio.sqlite3")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
RQ_QUEUES = {
    "default": {"URL": REDIS_URL, "DEFAULT_TIMEOUT": env_int("MISTUDIO_JOB_TIMEOUT", 24 * 3600)},
}
CHANNEL_LAYERS = {
    "default": {
        # Pub/sub: a group join is a SUBSCRIBE on one shared connection per process and a
        # group send one PUBLISH, so a burst of page loads opens no connection per socket
        # (the list-based layer ran out of pooled connections at a few hundred at once).
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {
            # redis-py 8 times socket reads out after 5 s by default; the layer polls with
            # its own short timeout, so a longer socket timeout only guards a hung Redis.
            "hosts": [{"address": REDIS_URL, "socket_timeout": 30}],
            "prefix": env_str("MISTUDIO_CHANNEL_PREFIX", "mistudio"),
        },
    }
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/login/"
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False  # htmx reads the token from the page, not the cookie
CSRF_FAILURE_VIEW = "mistudio.hardening.csrf_failure"  # JSON on /api/, a page elsewhere

# Serving over HTTPS (directly, or behind a TLS proxy): with these set, `manage.py check
# --deploy` reports no warnings. Off by default so http://127.0.0.1:8000 works as it is.
SECURE_SSL_REDIRECT = env_bool("MISTUDIO_SSL_REDIRECT", False)
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]  # a load balancer's health probe speaks plain HTTP
SECURE_HSTS_SECONDS = env_int("MISTUDIO_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("MISTUDIO_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("MISTUDIO_HSTS_PRELOAD", False)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env_bool("MISTUDIO_SECURE_COOKIES", False)
if env_bool("MISTUDIO_BEHIND_TLS_PROXY", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "staticfiles"

# Hub access. HF_ENDPOINT is read here, not by huggingface_hub at import, so a test can
# point a worker at a loopback server.
HF_ENDPOINT = env_str("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
HUB_RETRIES = env_int("MISTUDIO_HUB_RETRIES", 3)
HUB_RETRY_BACKOFF_SECONDS = float(env_str("MISTUDIO_HUB_RETRY_BACKOFF", "2.0"))

# Local imports are only read from these folders (resolved, symlinks followed).
IMPORT_ROOTS = [Path(p).resolve() for p in env_list("MISTUDIO_IMPORT_ROOTS", [str(DATA_DIR / "imports")])]


def env_bytes(name: str) -> int | None:
    """A size like 6GB, 6GiB, 512MB or plain bytes; None when unset."""
    raw = os.environ.get(name, "").strip().upper().replace(" ", "")
    if not raw:
        return None
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    for suffix, factor in units.items():
        if raw.endswith(suffix):
            return int(float(raw.removesuffix(suffix)) * factor)
    return int(raw)


# Memory a model may take when it is loaded (the fit check). Default: the GPU's free
# memory, or the free RAM on a machine without one.
GPU_MEMORY_LIMIT = env_bytes("MISTUDIO_GPU_MEMORY_LIMIT")
# The device-class queue a worker serves (besides "default"): "gpu" on a CUDA machine, else
# "cpu", unless named here (e.g. "a100" and "t4" for two kinds of GPU host).
WORKER_CLASS = env_str("MISTUDIO_WORKER_CLASS", "")
if WORKER_CLASS and not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,39}", WORKER_CLASS):
    raise ImproperlyConfigured("MISTUDIO_WORKER_CLASS must be a short lowercase name (letters, digits, - and _).")
DATASET_UPLOAD_LIMIT_BYTES = env_bytes("MISTUDIO_DATASET_UPLOAD_LIMIT") or 1_000_000_000
# A layer and hook of a quantized model whose mean cosine with FP32 is below this is flagged
# (the Extract dialog warns, the charts mark it).
FIDELITY_COSINE_WARN = float(os.environ.get("MISTUDIO_FIDELITY_COSINE_WARN", "") or 0.99)
# A Hub-streamed split's statistics read its first rows only (the page says how many).
DATASET_STATS_STREAM_ROWS = env_int("MISTUDIO_DATASET_STATS_STREAM_ROWS", 10_000)
DATA_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024  # larger uploads stream to a temporary file
# Server-side bounds of an extraction request.
EXTRACTION_MAX_BATCH_SIZE = env_int("MISTUDIO_MAX_BATCH_SIZE", 512)
EXTRACTION_MAX_SAMPLES = env_int("MISTUDIO_MAX_SAMPLES", 1_000_000)
# How often a running extraction makes its rows durable for a resume (0: every batch).
EXTRACTION_CHECKPOINT_SECONDS = float(env_str("MISTUDIO_CHECKPOINT_SECONDS", "30"))
# Free space a download must leave on the data dir's filesystem.
DISK_RESERVE_BYTES = env_int("MISTUDIO_DISK_RESERVE_BYTES", 1 << 30)
# Runs a row gets by itself: after the first, a worker death, a job timeout or a job lost
# before it started queues it again (going on from what it kept), this many runs in all.
JOB_ATTEMPTS = max(1, env_int("MISTUDIO_JOB_ATTEMPTS", 3))
# The wait before such a run starts, doubled for each further attempt (at most a minute).
JOB_RETRY_BACKOFF_SECONDS = float(env_str("MISTUDIO_JOB_RETRY_BACKOFF", "5"))
# How often a worker running a job beats its heartbeat (and checks on the job), in seconds.
JOB_MONITORING_SECONDS = env_int("MISTUDIO_JOB_MONITORING_SECONDS", 15)
# The perplexity figure over the reference text's first N tokens (0: all of it, ~2,300).
PERPLEXITY_MAX_TOKENS = env_int("MISTUDIO_PERPLEXITY_TOKENS", 0) or None

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "filters": {"once": {"()": "mistudio.logfilters.OncePerProcess"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {
        # httpx logs every request URL at INFO; keep the worker log about our jobs.
        "httpx": {"level": "WARNING"},
        "httpx2": {"level": "WARNING"},
        "django.channels.server": {"level": "WARNING"},
        # One line per int8 matmul on CPU otherwise (see OncePerProcess).
        "bitsandbytes.autograd._functions": {"filters": ["once"]},
    },
}

RQ = {"WORKER_CLASS": "mistudio.worker.MistudioWorker"}
