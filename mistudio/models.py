import hashlib
import secrets

from django.conf import settings
from django.db import models

TOKEN_PREFIX = "mis_"


def hash_api_token(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


class ApiToken(models.Model):
    """A per-user token for the JSON API (`Authorization: Bearer …`). Only its hash is kept."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, default="default")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    prefix = models.CharField(max_length=12, editable=False, help_text="First characters, to tell tokens apart.")
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.user} / {self.name} ({self.prefix}…)"

    @classmethod
    def user_for(cls, raw: str):
        """The active user a raw token signs in, or None; records its use (to the minute: a
        script polling the API should not cost a database write per request)."""
        token = cls.token_for(raw)
        return token.user if token is not None else None

    @classmethod
    def token_for(cls, raw: str):
        """The token a raw value is, with its active user, or None (see user_for)."""
        from datetime import timedelta

        from django.utils import timezone

        token = cls.objects.select_related("user").filter(key_hash=hash_api_token(raw)).first()
        if token is None or not token.user.is_active:
            return None
        now = timezone.now()
        if token.last_used_at is None or now - token.last_used_at > timedelta(minutes=1):
            cls.objects.filter(pk=token.pk).update(last_used_at=now)
        return token

    @classmethod
    def issue(cls, user, name: str = "default") -> tuple["ApiToken", str]:
        """A new token; the raw value is returned once and never stored."""
        raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token = cls.objects.create(user=user, name=name, key_hash=hash_api_token(raw), prefix=raw[:10])
        return token, raw
