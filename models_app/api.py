"""The JSON API: the same services as the page, errors as {"error": {…}}."""

import functools
import json

from django.core.paginator import EmptyPage, Paginator
from django.db.models import Q
from django.http import JsonResponse

from mistudio.errors import ServiceError, error_response

from . import services
from .models import Model, ModelStatus

MAX_PAGE_SIZE = 100


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


def json_body(request) -> dict:
    try:
        body = json.loads(request.body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ServiceError("invalid_json", "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ServiceError("invalid_json", "The request body must be a JSON object.")
    return body


def _int_param(request, name: str, default: int, low: int, high: int) -> int:
    raw = request.GET.get(name, "")
    if raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise ServiceError("invalid_parameter", f"{name} must be an integer from {low} to {high}.", details={"field": name})
    return int(raw)


@api_endpoint({"GET"})
def models_collection(request):
    queryset = Model.objects.all()
    status = request.GET.get("status", "")
    if status:
        if status not in ModelStatus.values:
            raise ServiceError(
                "invalid_parameter", f"status must be one of {', '.join(ModelStatus.values)}.", details={"field": "status"}
            )
        queryset = queryset.filter(status=status)
    search = request.GET.get("search", "").strip()
    if search:
        queryset = queryset.filter(
            Q(name__icontains=search) | Q(repo_id__icontains=search) | Q(architecture__icontains=search)
        )
    limit = _int_param(request, "limit", 20, 1, MAX_PAGE_SIZE)
    page_number = _int_param(request, "page", 1, 1, 10**6)
    paginator = Paginator(queryset, limit)
    try:
        page = paginator.page(page_number)
    except EmptyPage:
        page = None
    return JsonResponse(
        {
            "data": [m.as_dict(include_config=False) for m in page.object_list] if page else [],
            "pagination": {
                "page": page_number,
                "limit": limit,
                "total": paginator.count,
                "pages": paginator.num_pages,
                "has_next": bool(page and page.has_next()),
            },
        }
    )


@api_endpoint({"POST"})
def download(request):
    body = json_body(request)
    model = services.request_download(
        user=request.user,
        repo_id=body.get("repo_id") if isinstance(body.get("repo_id"), str) else "",
        quantization=str(body.get("quantization") or "FP32"),
        token=body.get("access_token") if isinstance(body.get("access_token"), str) else None,
        revision=body.get("revision") if isinstance(body.get("revision"), str) else None,
    )
    return JsonResponse(model.as_dict(), status=202)


@api_endpoint({"GET", "DELETE"})
def model_detail(request, model_id):
    if request.method == "DELETE":
        deleted = services.delete_model(model_id)
        return JsonResponse({"deleted": deleted, "id": model_id})
    return JsonResponse(services.get_model(model_id).as_dict())


@api_endpoint({"POST"})
def model_cancel(request, model_id):
    return JsonResponse(services.cancel_model(model_id).as_dict())


@api_endpoint({"POST"})
def model_quantize(request, model_id):
    body = json_body(request)
    model = services.request_quantize(
        user=request.user, model_id=model_id, quantization=str(body.get("quantization") or "")
    )
    return JsonResponse(model.as_dict(), status=202)


@api_endpoint({"GET"})
def model_architecture(request, model_id):
    return JsonResponse(services.architecture(model_id))


@api_endpoint({"POST"})
def estimate(request):
    body = json_body(request)
    return JsonResponse(
        services.estimate_repo(
            repo_id=body.get("repo_id") if isinstance(body.get("repo_id"), str) else "",
            revision=body.get("revision") if isinstance(body.get("revision"), str) else None,
            token=body.get("access_token") if isinstance(body.get("access_token"), str) else None,
        )
    )
