"""Bad input never reaches the database or a template as a 500: text PostgreSQL cannot
store (NUL, lone surrogates) is refused at the door, a refusal from a service raised in a
page view becomes its own status, and every error on /api/ answers in the API's JSON shape.
"""

from __future__ import annotations

import base64
import json

from django.conf import settings
from django.http import HttpResponse
from django.shortcuts import render
from django.utils.deprecation import MiddlewareMixin
from redis.exceptions import RedisError

from .api import error_response
from .errors import ServiceError
from .text import UNSTORABLE, storable


def is_api(request) -> bool:
    return request.path_info.startswith("/api/")


def refusal(request, status: int, code: str, message: str, details: dict | None = None):
    """The API's JSON error, or a plain page saying the same."""
    if is_api(request):
        return error_response(status, code, message, details)
    return render(request, "error.html", {"status": status, "message": message}, status=status)


class RefuseOversizedBody(MiddlewareMixin):
    """A body longer than the largest any route accepts (a dataset upload at its limit, plus
    the form around it) is refused from its Content-Length, before anything reads it to
    disk. Django's own DATA_UPLOAD_MAX_MEMORY_SIZE bounds everything else that is not a file."""

    FORM_MARGIN_BYTES = 1 << 20

    def process_request(self, request):
        raw = request.META.get("CONTENT_LENGTH") or "0"
        limit = settings.DATASET_UPLOAD_LIMIT_BYTES + self.FORM_MARGIN_BYTES
        if not (raw.isascii() and raw.isdigit()):
            return refusal(request, 400, "bad_request", "The Content-Length header is not a number.")
        if len(raw) > len(str(limit)) or int(raw) > limit:
            return refusal(request, 413, "request_too_large", f"The request is larger than the {limit / 1e6:,.0f} MB "
                                                              "accepted (MISTUDIO_DATASET_UPLOAD_LIMIT for a dataset upload).")  # fmt: skip
        return None


class RefuseUnstorableText(MiddlewareMixin):
    """A NUL (%00) or an unpaired surrogate in the path, a query parameter or a form field
    gets a 400 before any view runs. JSON bodies are checked where they are parsed."""

    def process_request(self, request):
        values = [request.path_info, *request.GET.keys(), *(v for vs in request.GET.lists() for v in vs[1])]
        if not all(storable(v) for v in values):
            return refusal(request, 400, "invalid_text", UNSTORABLE)
        return None

    def process_view(self, request, view_func, view_args, view_kwargs):
        if request.method == "POST" and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            values = [*request.POST.keys(), *(v for vs in request.POST.lists() for v in vs[1])]
            if not all(storable(v) for v in values):
                return refusal(request, 400, "invalid_text", UNSTORABLE)
        return None

    def process_exception(self, request, exception):
        if isinstance(exception, ServiceError):  # a page view that let a refusal through
            return refusal(request, exception.status, exception.code, exception.message, exception.details)
        return None


def bad_request(request, exception=None):
    return refusal(request, 400, "bad_request", "The request could not be read (too large, or malformed).")


def permission_denied(request, exception=None):
    return refusal(request, 403, "forbidden", "You may not do that.")


def page_not_found(request, exception=None):
    return refusal(request, 404, "not_found", "Nothing here: the address is wrong, or the record was deleted.")


def server_error(request):
    if is_api(request):
        return error_response(500, "internal_error", "Unexpected server error; see the server log.", retryable=True)
    return HttpResponse("Unexpected server error; see the server log.", status=500, content_type="text/plain")


def csrf_failure(request, reason=""):
    return refusal(request, 403, "csrf_failed", "The CSRF token is missing or wrong: reload the page, or use an API token.")


class AnswerOnce:
    """A POST sent twice with the same Idempotency-Key (a header, or the page's hidden
    `idempotency_key` field) is carried out once: the first claims the key in Redis, a
    second while the first runs gets 409 duplicate_request, and one after it gets the first
    one's answer again. Only answers below 400 are kept (ten minutes); a refusal frees the
    key, so the corrected request can be sent with it. The page's forms send a fresh key per
    submit (static/js/app.js); an API client may send its own. Without Redis it steps aside."""

    TTL_SECONDS = 600
    MAX_KEY_LENGTH = 100
    FORM_FIELD = "idempotency_key"

    def __init__(self, get_response):
        self.get_response = get_response

    def key_of(self, request) -> str | None:
        key = request.headers.get("Idempotency-Key")
        if key is None and request.content_type == "application/x-www-form-urlencoded":
            key = request.POST.get(self.FORM_FIELD)
        return key or None

    def __call__(self, request):
        user = getattr(request, "user", None)
        key = self.key_of(request) if request.method == "POST" and user and user.is_authenticated else None
        if key is None:
            return self.get_response(request)
        if len(key) > self.MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
            return refusal(request, 400, "invalid_idempotency_key",
                           f"The Idempotency-Key must be 1 to {self.MAX_KEY_LENGTH} printable ASCII characters.")  # fmt: skip
        slot = f"mistudio:answer-once:{user.pk}:{request.path}:{key}"
        try:
            from .queue import queue

            redis = queue().connection
            claimed = redis.set(slot, b"", nx=True, ex=self.TTL_SECONDS)
            kept = None if claimed else redis.get(slot)
        except RedisError:
            return self.get_response(request)
        if not claimed:
            if not kept:
                return refusal(request, 409, "duplicate_request", "The same request is already being carried out "
                                                                  "(it was sent twice); its result shows when it is done.")  # fmt: skip
            return self.replay(json.loads(kept))
        try:
            response = self.get_response(request)
        except BaseException:
            self.forget(redis, slot)
            raise
        if response.status_code < 400 and not response.streaming:
            try:
                redis.set(slot, json.dumps(self.keep(response)), ex=self.TTL_SECONDS)
            except RedisError:
                pass
        else:
            self.forget(redis, slot)
        return response

    HEADERS = ("Content-Type", "Location", "HX-Redirect", "HX-Trigger", "HX-Retarget", "HX-Reswap")

    @classmethod
    def keep(cls, response) -> dict:
        return {"status": response.status_code, "body": base64.b64encode(response.content).decode(),
                "headers": {name: response[name] for name in cls.HEADERS if response.has_header(name)}}  # fmt: skip

    @staticmethod
    def replay(kept: dict) -> HttpResponse:
        response = HttpResponse(base64.b64decode(kept["body"]), status=kept["status"])
        for name, value in kept["headers"].items():
            response[name] = value
        return response

    @staticmethod
    def forget(redis, slot: str) -> None:
        try:
            redis.delete(slot)
        except RedisError:
            pass
