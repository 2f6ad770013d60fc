"""What every JSON endpoint shares: the error shape {"error": {"code", "message",
"details", "retryable"}}, the method check, JSON body parsing and query parameters."""

from __future__ import annotations

import functools
import json

from django.http import JsonResponse

from .errors import InvalidInput, ServiceError
from .text import UNSTORABLE, storable
from .validation import bounded_int


def error_response(status: int, code: str, message: str, details: dict | None = None, retryable: bool = False):
    body = {"error": {"code": code, "message": message, "details": details or {}, "retryable": retryable}}
    return JsonResponse(body, status=status)


def api_endpoint(methods: set[str]):
    """Method check, JSON body parsing and ServiceError → error response, for every endpoint.
    CSRF stays enforced for cookie sessions (ApiTokenMiddleware lifts it for bearer tokens)."""

    def decorate(view):
        @functools.wraps(view)
        def wrapper(request, *args, **kwargs):
            if request.method not in methods:
                return error_response(405, "method_not_allowed", f"Use {' or '.join(sorted(methods))}.")
            try:
                return view(request, *args, **kwargs)
            except ServiceError as exc:
                return error_response(exc.status, exc.code, exc.message, exc.details, exc.retryable)

        return wrapper

    return decorate


MAX_JSON_DEPTH = 32


def json_body(request) -> dict:
    """The body as a JSON object whose every string can be stored: refused (400) when it is
    not JSON, nests deeper than any request needs, holds an integer too long to parse, or
    a string with NUL or an unpaired surrogate."""
    try:
        body = json.loads(request.body or b"{}")
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, an over-long integer
        raise ServiceError("invalid_json", "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ServiceError("invalid_json", "The request body must be a JSON object.")
    pending = [(key, value, 2) for pair in body.items() for key, value in [(pair[0], pair[0]), pair]]
    while pending:
        field, value, depth = pending.pop()  # `field`: the top-level key it sits under
        if depth > MAX_JSON_DEPTH:
            raise ServiceError("invalid_json", f"The request body nests deeper than {MAX_JSON_DEPTH} levels.")
        if isinstance(value, dict):
            pending.extend((field, item, depth + 1) for pair in value.items() for item in pair)
        elif isinstance(value, list):
            pending.extend((field, item, depth + 1) for item in value)
        elif isinstance(value, str) and not storable(value):
            raise ServiceError("invalid_text", f"{field if storable(field) else 'A key'}: {UNSTORABLE}",
                               details={"field": field if storable(field) else None})  # fmt: skip
    return body


def text_field(body: dict, name: str) -> str | None:
    """A JSON field that must be a string: anything else counts as absent."""
    value = body.get(name)
    return value if isinstance(value, str) else None


def int_param(request, name: str, default: int, low: int, high: int) -> int:
    try:
        value = bounded_int(request.GET.get(name, ""), name, low, high)
    except InvalidInput as exc:
        raise ServiceError("invalid_parameter", exc.message, details={"field": name}) from None
    return default if value is None else value


MAX_PAGE_SIZE = 100


def paginated(request, queryset, serialize, default_limit: int = 20) -> dict:
    """The one pagination rule of every list endpoint: `?page=` (from 1) and `?limit=` (1 to
    MAX_PAGE_SIZE), each refused with a 400 when it is not a whole number in range; a page
    past the end is empty, never another page. Newest first, as the models' own ordering."""
    from django.core.paginator import EmptyPage, Paginator

    limit = int_param(request, "limit", default_limit, 1, MAX_PAGE_SIZE)
    number = int_param(request, "page", 1, 1, 10**6)
    paginator = Paginator(queryset, limit)
    try:
        page = paginator.page(number)
    except EmptyPage:
        page = None
    return {
        "data": [serialize(row) for row in page.object_list] if page else [],
        "pagination": {"page": number, "limit": limit, "total": paginator.count, "pages": paginator.num_pages,
                       "has_next": bool(page and page.has_next())},
    }  # fmt: skip
