"""The JSON API: the same services as the page, errors as {"error": {…}}."""

from django.db.models import Q
from django.http import JsonResponse

from mistudio.api import api_endpoint, json_body, paginated, text_field
from mistudio.errors import ServiceError

from . import services
from .models import Model, ModelStatus



@api_endpoint({"GET"})
def models_collection(request):
    queryset = Model.objects.defer("architecture_config")  # a list leaves the config out
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
