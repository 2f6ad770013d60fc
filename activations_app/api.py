"""JSON API for datasets and extractions (same services as the commands)."""

from django.core.paginator import Paginator
from django.http import JsonResponse

from mistudio.errors import NotFound, ServiceError
from models_app.api import api_endpoint, json_body

from . import services
from .models import Dataset, Extraction


@api_endpoint({"GET", "POST"})
def datasets(request):
    """GET lists datasets; POST adds one: a multipart `file` upload, or JSON {"repo_id"} /
    {"path"} for a Hub dataset repo or a file under the import roots."""
    if request.method == "GET":
        return JsonResponse({"data": [d.as_dict() for d in Dataset.objects.all()[:500]]})
    if request.FILES.get("file") is not None:
        dataset = services.upload_dataset(
            upload=request.FILES["file"], name=request.POST.get("name") or None,
            text_column=request.POST.get("text_column") or "text",
        )  # fmt: skip
    else:
        body = json_body(request)
        source = body.get("repo_id") or body.get("path")
        if not isinstance(source, str) or not source:
            raise ServiceError("invalid_input", "Send a file, or repo_id / path.", details={"field": "file"})
        dataset = services.import_dataset(
            path=source, name=body.get("name") if isinstance(body.get("name"), str) else None,
            text_column=str(body.get("text_column") or "text"), split=str(body.get("split") or "train"),
            token=body.get("access_token") if isinstance(body.get("access_token"), str) else None,
        )  # fmt: skip
    return JsonResponse(dataset.as_dict(), status=201)


@api_endpoint({"GET", "DELETE"})
def dataset_detail(request, dataset_id):
    if request.method == "DELETE":
        return JsonResponse({"deleted": services.delete_dataset(dataset_id), "id": dataset_id})
    dataset = Dataset.objects.filter(pk=dataset_id).first()
    if dataset is None:
        raise NotFound("dataset_not_found", f"No dataset with id {dataset_id!r}.")
    return JsonResponse(dataset.as_dict())


@api_endpoint({"POST"})
def extract(request, model_id):
    body = json_body(request)
    dataset_id = body.get("dataset_id")
    if not isinstance(dataset_id, str):
        raise ServiceError("invalid_input", "dataset_id is required.", details={"field": "dataset_id"})
    fields = {k: body[k] for k in ("layers", "hook_types", "batch_size", "max_samples", "seq_len", "dtype", "tokenization") if k in body}
    extraction = services.request_extraction(model_id=model_id, dataset_id=dataset_id, **fields)
    return JsonResponse(extraction.as_dict(), status=202)


@api_endpoint({"GET"})
def extractions(request):
    queryset = Extraction.objects.all()
    if request.GET.get("model_id"):
        queryset = queryset.filter(model_id=request.GET["model_id"])
    page = Paginator(queryset, 50).get_page(request.GET.get("page") or 1)
    return JsonResponse({"data": [e.as_dict() for e in page.object_list], "pagination": {"page": page.number, "pages": page.paginator.num_pages, "total": page.paginator.count}})


@api_endpoint({"GET", "DELETE"})
def extraction_detail(request, extraction_id):
    extraction = Extraction.objects.filter(pk=extraction_id).first()
    if request.method == "DELETE":
        if extraction is None:
            return JsonResponse({"deleted": False, "id": extraction_id})
        return JsonResponse({"deleted": services.delete_extraction(extraction), "id": extraction_id})
    if extraction is None:
        raise NotFound("extraction_not_found", f"No extraction with id {extraction_id!r}.")
    return JsonResponse(extraction.as_dict())
