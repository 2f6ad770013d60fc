"""JSON API for datasets and extractions (same services as the page and the commands)."""

from django.http import JsonResponse

from mistudio.api import api_endpoint, json_body, paginated, text_field
from mistudio.errors import ServiceError

from . import services
from .forms import DatasetFilters, ExtractionFilters
from .ml.extract import ExtractionSpec
from .models import Dataset, Export, Extraction


@api_endpoint({"GET", "POST"})
def datasets(request):
    """GET lists datasets; POST adds one: a multipart `file` upload (201, ready), a file
    under the import roots as JSON {"path"} (201, ready), or a Hub dataset repo as JSON
    {"repo_id", "split"?, "config"?, "revision"?, "access_token"?, "download_whole"?} (202,
    imported by a job: streamed from the Hub unless `download_whole` is true)."""
    if request.method == "GET":
        filters = DatasetFilters(request.GET)
        problem = filters.problem()
        if problem:
            raise ServiceError("invalid_parameter", problem[1], details={"field": problem[0]})
        return JsonResponse(paginated(request, filters.apply(Dataset.objects.all()), Dataset.as_dict))
    if request.FILES.get("file") is not None:
        dataset = services.upload_dataset(
            user=request.user, upload=request.FILES["file"], name=request.POST.get("name") or None,
            text_column=request.POST.get("text_column") or "text",
        )  # fmt: skip
    else:
        body = json_body(request)
        source = text_field(body, "repo_id") or text_field(body, "path")
        if not source:
            raise ServiceError("invalid_input", "Send a file, or repo_id / path.", details={"field": "file"})
        dataset = services.import_dataset(
            user=request.user, path=source, name=text_field(body, "name"), text_column=str(body.get("text_column") or "text"),
            split=str(body.get("split") or "train"), token=text_field(body, "access_token"),
            revision=text_field(body, "revision"), config=text_field(body, "config"),
            download_whole=_flag(body, "download_whole"),
        )  # fmt: skip
    return JsonResponse(dataset.as_dict(), status=202 if dataset.is_running else 201)


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise ServiceError("invalid_input", f"{name} must be true or false.", details={"field": name})
    return value


@api_endpoint({"GET", "DELETE"})
def dataset_detail(request, dataset_id):
    if request.method == "DELETE":
        return JsonResponse({"deleted": services.delete_dataset(dataset_id, request.user), "id": dataset_id})
    return JsonResponse(Dataset.get_or_404(dataset_id).as_dict())


@api_endpoint({"POST"})
def dataset_cancel(request, dataset_id):
    return JsonResponse(services.cancel_dataset(dataset_id, request.user).as_dict())


@api_endpoint({"POST"})
def dataset_statistics(request, dataset_id):
    """Measure the dataset again (a job); `model_id` adds tokens per row with that model's
    tokenizer. 202 with `statistics.state` "computing"; GET the dataset for the figures."""
    model_id = text_field(json_body(request), "model_id") or ""
    return JsonResponse(services.request_dataset_statistics(dataset_id, request.user, model_id).as_dict(), status=202)


@api_endpoint({"POST"})
def dataset_retry(request, dataset_id):
    body = json_body(request)
    token, column = text_field(body, "access_token"), text_field(body, "text_column")
    return JsonResponse(services.retry_dataset(dataset_id, request.user, token, column).as_dict(), status=202)


@api_endpoint({"POST"})
def extract(request, model_id):
    body = json_body(request)
    dataset_id = body.get("dataset_id")
    if not isinstance(dataset_id, str):
        raise ServiceError("invalid_input", "dataset_id is required.", details={"field": "dataset_id"})
    data = {name: body[name] for name in ExtractionSpec.request_fields() if name in body}
    extraction = services.request_extraction(model_id=model_id, dataset_id=dataset_id, data=data, user=request.user)
    return JsonResponse(extraction.as_dict(), status=202)


@api_endpoint({"GET"})
def extractions(request):
    filters = ExtractionFilters(request.GET)
    problem = filters.problem()
    if problem:
        raise ServiceError("invalid_parameter", problem[1], details={"field": problem[0]})
    return JsonResponse(paginated(request, filters.apply(Extraction.objects.all()), Extraction.as_dict))


@api_endpoint({"GET", "DELETE"})
def extraction_detail(request, extraction_id):
    if request.method == "DELETE":
        return JsonResponse({"deleted": services.delete_extraction(extraction_id, request.user), "id": extraction_id})
    return JsonResponse(Extraction.get_or_404(extraction_id).as_dict())


@api_endpoint({"POST"})
def extraction_cancel(request, extraction_id):
    """`{"keep": true}` keeps what the run made durable, for a later resume."""
    body = json_body(request) if request.content_type == "application/json" else {}
    keep = body.get("keep", False) if isinstance(body, dict) else False
    if not isinstance(keep, bool):
        raise ServiceError("invalid_input", "keep must be true or false.", details={"field": "keep"})
    return JsonResponse(services.cancel_extraction(extraction_id, request.user, keep=keep).as_dict())


@api_endpoint({"POST"})
def extraction_export(request, extraction_id):
    """`{"format": "saelens", "naming": "hf"|"tl", "shuffle": SEED}` → 202 and the export's record (follow it at
    /api/exports/{id}); the datasets land in `extraction_{id}/saelens/`, their rows permuted by the seed when one is
    given. 409 while one of the same format runs."""
    body = json_body(request) if request.content_type == "application/json" else {}
    fmt = text_field(body, "format") if isinstance(body, dict) else None
    naming = text_field(body, "naming") if isinstance(body, dict) else None
    shuffle = body.get("shuffle") if isinstance(body, dict) else None
    export = services.export_extraction(extraction_id, request.user, fmt or "saelens", naming=naming, shuffle=shuffle)
    return JsonResponse(export.as_dict(), status=202)


@api_endpoint({"GET"})
def export_detail(request, export_id):
    return JsonResponse(Export.get_or_404(export_id).as_dict())


@api_endpoint({"POST"})
def export_cancel(request, export_id):
    return JsonResponse(services.cancel_export(export_id, request.user).as_dict())


@api_endpoint({"POST"})
def export_retry(request, export_id):
    return JsonResponse(services.retry_export(export_id, request.user).as_dict(), status=202)


@api_endpoint({"POST"})
def extraction_resume(request, extraction_id):
    return JsonResponse(services.resume_extraction(extraction_id, request.user).as_dict(), status=202)


@api_endpoint({"POST"})
def extraction_retry(request, extraction_id):
    return JsonResponse(services.retry_extraction(extraction_id, request.user).as_dict(), status=202)


@api_endpoint({"GET"})
def templates(request):
    """The caller's extraction templates, favourites first."""
    return JsonResponse({"data": [t.as_dict() for t in services.list_templates(request.user)]})


@api_endpoint({"POST"})
def template_save(request, model_id):
    """`{name, layers, hook_types, ...settings, favourite?}`, validated against this model →
    201; a name the caller already has is replaced."""
    body = json_body(request)
    data = {name: body[name] for name in ExtractionSpec.request_fields() if name in body}
    favourite = _flag(body, "favourite") if "favourite" in body else None
    template = services.save_template(model_id=model_id, name=body.get("name"), data=data, user=request.user, favourite=favourite)
    return JsonResponse(template.as_dict(), status=201)


@api_endpoint({"GET", "DELETE"})
def template_detail(request, template_id):
    if request.method == "DELETE":
        services.delete_template(template_id, request.user)
        return JsonResponse({"deleted": True, "id": template_id})
    return JsonResponse(services.get_template(template_id, request.user).as_dict())


@api_endpoint({"POST"})
def template_favourite(request, template_id):
    """`{"favourite": true|false}`."""
    body = json_body(request)
    return JsonResponse(services.favourite_template(template_id, request.user, _flag(body, "favourite")).as_dict())
