"""Datasets and Extractions tabs, the extraction dialog and its live estimates."""

from urllib.parse import urlencode

from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from mistudio.api import int_param
from mistudio.consumers import ROW_ID
from mistudio.errors import NotFound, ServiceError
from models_app.services import get_model, ready_models

from . import services
from .charts import HOOK_LABELS
from .forms import DatasetFilters, ExtractionFilters, ExtractionForm
from .ml.hooks import HOOK_TYPES
from .models import Dataset, Export, Extraction


def _datasets_page(request, status: int = 200, filters=None, **context):
    page = Dataset.panel_page(filters=filters if filters is not None else DatasetFilters(request.GET))
    return render(request, "activations_app/datasets.html", {**page, "sorts": list(DatasetFilters.SORT_LABELS.items()), **context},
                  status=status)  # fmt: skip


@require_GET
def datasets_page(request):
    """The Datasets page; its query (?search=, status, source, sort) narrows the list, so a
    link or a reload keeps what was chosen."""
    return _datasets_page(request)


@require_GET
def more_datasets(request):
    """The next page of cards, appended where the "Show more" button was."""
    page = int_param(request, "page", 1, 1, 10**6)
    return render(request, "activations_app/_dataset_page.html", Dataset.panel_page(page, DatasetFilters(request.GET)))


def _back_to_datasets(request):
    """After a card's action: the page again, with the filters its form sent along."""
    query = DatasetFilters(request.POST).query()
    return redirect(reverse("activations:datasets") + (f"?{query}" if query else ""))


@require_POST
def dataset_upload(request):
    upload = request.FILES.get("file")
    error = None
    if upload is None:
        error = "Choose a file to upload."
    else:
        try:
            services.upload_dataset(
                user=request.user, upload=upload, name=request.POST.get("name") or None, text_column=request.POST.get("text_column") or "text"
            )
        except ServiceError as exc:
            error = exc.message
    if error:
        return _datasets_page(request, status=400, upload_error=error)
    # Post/redirect/get: a reload of the page that follows does not upload the file again.
    return redirect("activations:datasets")


@require_POST
def dataset_import(request):
    """A Hub dataset: refused at once when the repo, split or token is wrong, else queued."""
    try:
        services.request_hub_dataset(
            user=request.user, repo_id=request.POST.get("repo_id", ""), name=request.POST.get("name") or None,
            text_column=request.POST.get("text_column") or "text", split=request.POST.get("split") or "train",
            token=request.POST.get("access_token") or None, revision=request.POST.get("revision") or None,
            config=request.POST.get("config") or None, download_whole=request.POST.get("download_whole") == "1",
        )  # fmt: skip
    except ServiceError as exc:
        # The form as it was sent (token aside), so the user corrects one field, not all of them.
        sent = {field: request.POST.get(field, "") for field in ("repo_id", "split", "text_column", "config", "name", "revision")}
        return _datasets_page(request, status=exc.status, import_error=exc.message, hub=sent,
                              download_whole=request.POST.get("download_whole") == "1")  # fmt: skip
    return redirect("activations:datasets")


def _dataset_action(request, action, dataset_id):
    """A card's button: back to the page, or the page with the reason it was refused."""
    try:
        action(dataset_id, request.user)
    except ServiceError as exc:
        return _datasets_page(request, status=exc.status, filters=DatasetFilters(request.POST), list_error=exc.message)
    return _back_to_datasets(request)


@require_POST
def dataset_cancel(request, dataset_id):
    return _dataset_action(request, services.cancel_dataset, dataset_id)


@require_POST
def dataset_retry(request, dataset_id):
    token = request.POST.get("access_token") or None
    column = request.POST.get("text_column")  # only on a card whose column was wrong
    return _dataset_action(request, lambda pk, user: services.retry_dataset(pk, user, token, column), dataset_id)


@require_GET
def dataset_detail(request, dataset_id):
    """The dataset's modal: Overview, Samples (whole rows, a page at a time), Tokenization,
    Statistics (over the whole dataset, measured by a job)."""
    dataset = get_object_or_404(Dataset, pk=dataset_id)
    return render(request, "activations_app/_dataset_modal.html", {"dataset": dataset, "models": ready_models(),
                                                                  **_samples_context(request, dataset_id, 1)})  # fmt: skip


def _samples_context(request, dataset_id: str, page: int) -> dict:
    try:
        return services.dataset_samples(dataset_id, request.user, page)
    except ServiceError as exc:
        return {"samples_refusal": exc.message}


@require_GET
def dataset_samples(request, dataset_id):
    """One page of whole rows (Previous / Next in the Samples tab)."""
    get_object_or_404(Dataset, pk=dataset_id)
    page = int_param(request, "page", 1, 1, 10**7)
    return render(request, "activations_app/_dataset_samples.html", _samples_context(request, dataset_id, page))


@require_http_methods(["GET", "POST"])
def dataset_statistics(request, dataset_id):
    """The Statistics tab: GET shows what is stored (and polls while a job measures); POST
    measures again, with the chosen model's tokenizer for tokens per row."""
    dataset = get_object_or_404(Dataset, pk=dataset_id)
    refusal = None
    if request.method == "POST":
        try:
            dataset = services.request_dataset_statistics(dataset_id, request.user, request.POST.get("model_id", ""))
        except ServiceError as exc:
            refusal = exc.message
    return render(request, "activations_app/_dataset_statistics.html",
                  {"dataset": dataset, "models": ready_models(), "refusal": refusal})  # fmt: skip


@require_GET
def dataset_tokens(request, dataset_id):
    try:
        result = services.dataset_tokenization(dataset_id, request.GET.get("model_id", ""), request.user)
    except ServiceError as exc:
        return render(request, "activations_app/_dataset_tokens.html", {"refusal": exc.message})
    return render(request, "activations_app/_dataset_tokens.html", result)


@require_POST
def dataset_delete(request, dataset_id):
    return _dataset_action(request, services.delete_dataset, dataset_id)


@require_GET
def extractions_page(request):
    """Every extraction, or one model's history with ?model_id=; ?search=, status,
    dataset_id and sort narrow it, kept in the URL."""
    filters = ExtractionFilters(request.GET)
    page = Extraction.panel_page(filters=filters)
    model_id = page["model_id"]
    try:
        model = get_model(model_id) if model_id and ROW_ID.fullmatch(model_id) else None
    except ServiceError:  # gone: its extractions still say what it was
        model = None
    # Named as the model's card names it; a deleted model by what its extractions recorded.
    label = f"{model.name} {model.quantization}" if model else (
        Extraction.objects.filter(model_id=model_id).values_list("model_label", flat=True).first() if model_id else "")
    return render(request, "activations_app/extractions.html", {**page, "model_label": label or model_id,
                                                                "sorts": list(ExtractionFilters.SORT_LABELS.items())})  # fmt: skip


@require_GET
def more_extractions(request):
    """The next page of cards, appended where the "Show more" button was."""
    page = int_param(request, "page", 1, 1, 10**6)
    return render(request, "activations_app/_extraction_page.html", Extraction.panel_page(page, ExtractionFilters(request.GET)))


@require_GET
def extraction_detail(request, extraction_id):
    return _detail_page(request, extraction_id)


def _detail_page(request, extraction_id, action_error: str | None = None, status: int = 200):
    extraction = get_object_or_404(Extraction.rows(), pk=extraction_id)
    return render(request, "activations_app/extraction_detail.html", {
        "extraction": extraction, "body": extraction.detail_html(action_error=action_error)}, status=status)  # fmt: skip


@require_GET
def extraction_dialog(request, model_id):
    """The Extract dialog; `?template=` fills it from a saved template (`dataset_id` kept)."""
    model = get_model(model_id)
    request_fields, notice = {"hook_types": ["residual"]}, None
    template_id = request.GET.get("template", "")
    if request.GET.get("carry"):  # the same request, carried over from another model's dialog
        request_fields = {"layers": [int(v) for v in request.GET.getlist("layers") if v.isdigit() and len(v) <= 6 and int(v) < model.num_layers],
                          "hook_types": [h for h in request.GET.getlist("hook_types") if h in HOOK_TYPES],
                          **{name: request.GET[name] for name in ExtractionForm.SETTINGS if name in request.GET}}  # fmt: skip
    elif template_id:
        try:
            template = services.get_template(template_id, request.user)
        except ServiceError as exc:
            notice = exc.message
        else:
            request_fields, dropped = services.template_for_model(template, model)
            notice = f"Loaded “{template.name}”." + (f" Layers {dropped} are beyond this model's {model.num_layers} and were left out." if dropped else "")
    settings = {name: request_fields[name] for name in ExtractionForm.SETTINGS if name in request_fields}
    return render(request, "activations_app/_extract_dialog.html", {
        "model": model, "form": ExtractionForm(model=model, initial=settings), "datasets": Dataset.objects.filter(status="ready"),
        "layer_range": range(model.num_layers), "hooks": [(h, HOOK_LABELS[h]) for h in HOOK_TYPES],
        "checked_layers": set(request_fields.get("layers", [])), "checked_hooks": set(request_fields.get("hook_types", [])),
        # The dataset chosen last in this session's dialog, unless one (or none) is passed: a reopened dialog keeps it.
        "dataset_id": request.GET["dataset_id"] if "dataset_id" in request.GET else request.session.get(LAST_DATASET_KEY, ""),
        "carried": bool(request.GET.get("carry")),
        **_template_bar(request, template_id, notice),
    })  # fmt: skip


def _template_bar(request, selected: str = "", notice: str | None = None, refusal: str | None = None) -> dict:
    return {"templates": services.list_templates(request.user), "selected_template": selected, "template_notice": notice,
            "template_refusal": refusal}  # fmt: skip


def _render_template_bar(request, model, selected="", notice=None, refusal=None, status=200):
    return render(request, "activations_app/_template_bar.html", {"model": model, **_template_bar(request, selected, notice, refusal)},
                  status=status)  # fmt: skip


@require_POST
def template_save(request, model_id):
    model = get_model(model_id)
    try:
        template = services.save_template(model_id=model_id, name=request.POST.get("template_name", ""), data=request.POST,
                                          user=request.user)  # fmt: skip
    except ServiceError as exc:
        return _render_template_bar(request, model, refusal=exc.message, status=exc.status if exc.status != 404 else 409)
    return _render_template_bar(request, model, template.id, notice=f"Saved “{template.name}”.")


@require_POST
def template_favourite(request, model_id):
    model = get_model(model_id)
    try:
        template = services.favourite_template(request.POST.get("template", ""), request.user, None)
    except ServiceError as exc:
        return _render_template_bar(request, model, refusal=exc.message, status=409)
    return _render_template_bar(request, model, template.id,
                                notice=f"“{template.name}” {'is a favourite' if template.favourite else 'is no longer a favourite'}.")  # fmt: skip


@require_POST
def template_delete(request, model_id):
    model = get_model(model_id)
    try:
        template = services.delete_template(request.POST.get("template", ""), request.user)
    except ServiceError as exc:
        return _render_template_bar(request, model, refusal=exc.message, status=409)
    return _render_template_bar(request, model, notice=f"Deleted “{template.name}”.")


LAST_DATASET_KEY = "extract_dataset_id"


@require_POST
def extraction_estimate(request, model_id):
    """The dialog's estimates as its fields change; with no dataset chosen yet, the hint
    (not an error: nothing was asked yet)."""
    dataset_id = request.POST.get("dataset_id", "")
    if not dataset_id:
        get_model(model_id)  # a missing model is still a 404 page
        return render(request, "activations_app/_extract_estimate.html", {"hint": True})
    request.session[LAST_DATASET_KEY] = dataset_id[:16]
    try:
        estimate = services.estimate_request(model_id=model_id, dataset_id=dataset_id, data=request.POST)
    except ServiceError as exc:  # shown in the dialog; only the model itself gone is a 404
        status = exc.status if isinstance(exc, NotFound) and exc.code == "model_not_found" else 200
        return render(request, "activations_app/_extract_estimate.html", {"refusal": exc.message}, status=status)
    # What the dialog asked, to carry to the source-precision model's dialog when the fidelity warning offers it.
    carried = ("dataset_id", "layers", "hook_types", *ExtractionForm.SETTINGS)
    carry = urlencode([(name, value) for name in carried for value in request.POST.getlist(name)])
    return render(request, "activations_app/_extract_estimate.html", {"estimate": estimate, "carry": carry})


@require_POST
def extraction_start(request, model_id):
    try:
        extraction = services.request_extraction(
            model_id=model_id, dataset_id=request.POST.get("dataset_id", ""), data=request.POST, user=request.user
        )
    except ServiceError as exc:  # shown above Start until the request changes
        # A model or dataset deleted since the dialog opened is a conflict with what it shows
        # (a 404 would not be swapped in).
        status = 409 if isinstance(exc, NotFound) else exc.status
        return render(request, "activations_app/_extract_estimate.html", {"refusal": exc.message, "start": True}, status=status)
    # The dialog follows the run until its first progress, then opens its page.
    return render(request, "activations_app/_extract_started.html", {"extraction": extraction})


def _act_on_extraction(request, extraction_id, action):
    """The detail page's buttons: do it, then show the page again; a refusal (not the
    owner, nothing to resume, not finished) is shown on the page with its status."""
    try:
        action()
    except ServiceError as exc:
        return _detail_page(request, extraction_id, action_error=exc.message, status=exc.status)
    return redirect("activations:extraction", extraction_id=extraction_id)


@require_POST
def extraction_cancel(request, extraction_id):
    keep = request.POST.get("keep") == "1"
    return _act_on_extraction(request, extraction_id, lambda: services.cancel_extraction(extraction_id, request.user, keep=keep))


@require_POST
def extraction_resume(request, extraction_id):
    return _act_on_extraction(request, extraction_id, lambda: services.resume_extraction(extraction_id, request.user))


@require_POST
def extraction_export(request, extraction_id):
    shuffle = request.POST.get("shuffle")  # optional: a seed that permutes the rows across the export
    return _act_on_extraction(request, extraction_id,
                              lambda: services.export_extraction(extraction_id, request.user, "saelens", shuffle=shuffle))  # fmt: skip


def _act_on_export(request, export_id, action):
    """An export card's buttons, on its extraction's page: done, or refused there."""
    export = get_object_or_404(Export.rows(), pk=export_id)
    return _act_on_extraction(request, export.extraction_id, action)


@require_POST
def export_cancel(request, export_id):
    return _act_on_export(request, export_id, lambda: services.cancel_export(export_id, request.user))


@require_POST
def export_retry(request, export_id):
    return _act_on_export(request, export_id, lambda: services.retry_export(export_id, request.user))


@require_POST
def extraction_delete(request, extraction_id):
    """From a card (htmx): the card goes, or shows why not; from the detail page: back to
    the list. Without JavaScript: the list, or the detail page with the refusal."""
    htmx = request.headers.get("HX-Request") == "true"
    try:
        services.delete_extraction(extraction_id, request.user)
    except ServiceError as exc:
        if not htmx:
            return _detail_page(request, extraction_id, action_error=exc.message, status=exc.status)
        extraction = get_object_or_404(Extraction.rows(), pk=extraction_id)
        return HttpResponse(extraction.card_html(card_error=exc.message), status=exc.status)
    if not htmx:
        return redirect("activations:extractions")
    response = HttpResponse("")
    if request.POST.get("from") == "detail":
        response["HX-Redirect"] = reverse("activations:extractions")
    return response


@require_POST
def extraction_retry(request, extraction_id):
    return _act_on_extraction(request, extraction_id, lambda: services.retry_extraction(extraction_id, request.user))
