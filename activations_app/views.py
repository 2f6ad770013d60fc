"""Datasets and Extractions tabs, the extraction dialog and its live estimates."""

from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_POST

from mistudio.errors import ServiceError
from models_app import services as model_services

from . import services
from .ml.hooks import HOOK_TYPES
from .models import Dataset, Extraction

HOOK_LABELS = {"residual": "Residual Stream", "mlp": "MLP Output", "attention": "Attention Output"}


@require_GET
def datasets_page(request):
    return render(request, "activations_app/datasets.html", {"datasets": Dataset.objects.all()})


@require_POST
def dataset_upload(request):
    upload = request.FILES.get("file")
    error = None
    if upload is None:
        error = "Choose a file to upload."
    else:
        try:
            services.upload_dataset(
                upload=upload, name=request.POST.get("name") or None, text_column=request.POST.get("text_column") or "text"
            )
        except ServiceError as exc:
            error = exc.message
    context = {"datasets": Dataset.objects.all(), "upload_error": error}
    return render(request, "activations_app/datasets.html", context, status=400 if error else 200)


@require_POST
def dataset_delete(request, dataset_id):
    try:
        services.delete_dataset(dataset_id)
    except ServiceError as exc:
        return render(request, "activations_app/datasets.html", {"datasets": Dataset.objects.all(), "upload_error": exc.message}, status=exc.status)
    return redirect("activations:datasets")


@require_GET
def extractions_page(request):
    """Every extraction, or one model's history with ?model_id=."""
    extractions = Extraction.objects.select_related("model", "dataset")
    model_id = request.GET.get("model_id")
    if model_id:
        extractions = extractions.filter(model_id=model_id)
    return render(request, "activations_app/extractions.html", {"extractions": extractions[:200], "model_id": model_id})


@require_GET
def extraction_detail(request, extraction_id):
    extraction = get_object_or_404(Extraction.objects.select_related("model", "dataset"), pk=extraction_id)
    thresholds = {s.get("sparsity_threshold") for s in extraction.statistics.values()}
    return render(request, "activations_app/extraction_detail.html", {
        "extraction": extraction, "sparsity_threshold": ", ".join(str(t) for t in sorted(thresholds)),
    })  # fmt: skip


def _form_fields(post) -> dict:
    """The form's strings as they came: the service parses and bounds every one of them,
    with the same messages as the API and the command."""
    return {
        "layers": [services.whole_number(x) for x in post.getlist("layers")],
        "hook_types": post.getlist("hook_types"),
        "batch_size": post.get("batch_size") or 32,
        "max_samples": post.get("max_samples") or 1000,
        "seq_len": post.get("seq_len") or 128,
        "dtype": post.get("dtype", "float16"),
        "tokenization": post.get("tokenization", "packed"),
    }


@require_GET
def extraction_dialog(request, model_id):
    model = model_services.get_model(model_id)
    config = model.architecture_config or {}
    num_layers = int(config.get("num_hidden_layers") or config.get("n_layer") or 0)
    return render(request, "activations_app/_extract_dialog.html", {
        "model": model, "datasets": Dataset.objects.filter(status="ready"), "layer_range": range(num_layers),
        "hooks": [(h, HOOK_LABELS[h]) for h in HOOK_TYPES],
        "max_positions": config.get("max_position_embeddings") or config.get("n_positions"),
    })  # fmt: skip


@require_POST
def extraction_estimate(request, model_id):
    model = model_services.get_model(model_id)
    dataset = Dataset.objects.filter(pk=request.POST.get("dataset_id", "")).first()
    try:
        if dataset is None:
            raise ServiceError("invalid_input", "Choose a dataset.")
        fields = _form_fields(request.POST)
        clean = services.validate_request(model, dataset, **{k: fields[k] for k in ("batch_size", "max_samples", "seq_len", "dtype", "tokenization")},
                                          layers=fields["layers"], hooks=fields["hook_types"])  # fmt: skip
        estimate = services.estimate_extraction(model, clean, dataset)
    except ServiceError as exc:
        return render(request, "activations_app/_extract_estimate.html", {"refusal": exc.message})
    return render(request, "activations_app/_extract_estimate.html", {"estimate": estimate})


@require_POST
def extraction_start(request, model_id):
    try:
        extraction = services.request_extraction(
            model_id=model_id, dataset_id=request.POST.get("dataset_id", ""), **_form_fields(request.POST)
        )
    except ServiceError as exc:
        return render(request, "activations_app/_extract_estimate.html", {"refusal": exc.message}, status=exc.status)
    response = HttpResponse(status=204)
    response["HX-Redirect"] = f"/extractions/{extraction.id}"
    return response


@require_POST
def extraction_cancel(request, extraction_id):
    try:
        services.cancel_extraction(extraction_id)
    except ServiceError:
        pass
    return redirect("activations:extraction", extraction_id=extraction_id)
