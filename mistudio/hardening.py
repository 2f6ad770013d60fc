"""Bad input never reaches the database or a template as a 500: text PostgreSQL cannot
store (NUL, lone surrogates) is refused at the door, a refusal from a service raised in a
page view becomes its own status, and every error on /api/ answers in the API's JSON shape.
"""

from __future__ import annotations

from django.http import HttpResponse
from django.shortcuts import render
from django.utils.deprecation import MiddlewareMixin

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
