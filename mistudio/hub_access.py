"""What a Hub job takes from the server's side: the user's stored token and the retry
policy from the settings (read at call time, so a test or a restart can change them)."""

from __future__ import annotations

from django.conf import settings

from .crypto import decrypt_secret
from .errors import JobError


def stored_token(encrypted: bytes | memoryview | None) -> str | None:
    """The Hub token a row keeps encrypted for its job; None when the user gave none."""
    if not encrypted:
        return None
    try:
        return decrypt_secret(encrypted)
    except ValueError:
        raise JobError("token_unreadable", "The stored Hub token cannot be decrypted here: the worker's SECRET_KEY "
                                           "differs from the web server's. Fix that, then start again with the token.") from None  # fmt: skip


def retry_policy() -> dict:
    return {"retries": settings.HUB_RETRIES, "backoff_seconds": settings.HUB_RETRY_BACKOFF_SECONDS}
