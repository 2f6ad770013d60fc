"""The JSON API: the same services as the page, errors as {"error": {…}}."""

from django.http import JsonResponse

from mistudio.api import api_endpoint, json_body, paginated, text_field
from mistudio.errors import ServiceError

from . import services
from .forms import ModelFilters
from .models import Model



@api_endpoint({"GET"})
def models_collection(request):
    """The list as the page narrows it (ModelFilters: search, status, format, architecture,
    sort), a page at a time; `pagination.total` counts the matching rows."""
    filters = ModelFilters(request.GET)
    problem = filters.problem()
    if problem:
        raise ServiceError("invalid_parameter", problem[1], details={"field": problem[0]})
    queryset = filters.apply(Model.objects.defer("architecture_config"))  # a list leaves the config out
    return JsonResponse(paginated(request, queryset, lambda m: m.as_dict(include_config=False)))


@api_endpoint({"POST"})
def download(request):
    body = json_body(request)
    model = services.request_download(
        user=request.user,
        repo_id=text_field(body, "repo_id") or "",
        quantization=str(body.get("quantization") or "FP32"),
        token=text_field(body, "access_token"),
        revision=text_field(body, "revision"),
        allow_duplicate=body.get("allow_duplicate") is True,
    )
    return JsonResponse(model.as_dict(), status=202)


@api_endpoint({"GET", "DELETE"})
def model_detail(request, model_id):
    if request.method == "DELETE":
        deleted = services.delete_model(model_id, request.user)
        return JsonResponse({"deleted": deleted, "id": model_id})
    return JsonResponse(services.get_model(model_id).as_dict())


@api_endpoint({"POST"})
def model_cancel(request, model_id):
    return JsonResponse(services.cancel_model(model_id, request.user).as_dict())


@api_endpoint({"POST"})
def model_retry(request, model_id):
    body = json_body(request)
    return JsonResponse(services.retry_model(model_id, request.user, text_field(body, "access_token")).as_dict(), status=202)


@api_endpoint({"POST"})
def model_quantize(request, model_id):
    body = json_body(request)
    model = services.request_quantize(
        user=request.user, model_id=model_id, quantization=str(body.get("quantization") or "")
    )
    return JsonResponse(model.as_dict(), status=202)


@api_endpoint({"POST"})
def model_verify(request, model_id):
    """Re-check the model's files against their SHA-256 (a job): 202 with `verification`
    "checking"; the row's `verification` has the outcome when it is done."""
    return JsonResponse(services.request_verify(model_id, request.user).as_dict(include_config=False), status=202)


@api_endpoint({"GET"})
def model_architecture(request, model_id):
    return JsonResponse(services.architecture(model_id))


@api_endpoint({"POST"})
def estimate(request):
    body = json_body(request)
    return JsonResponse(
        services.estimate_repo(
            repo_id=text_field(body, "repo_id") or "",
            revision=text_field(body, "revision"),
            token=text_field(body, "access_token"),
        )
    )
