"""Thin views: validate with a form, call one service, render a page or its partial."""

import json

from django.conf import settings
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from mistudio.api import int_param
from mistudio.errors import NotFound, ServiceError

from . import charts, services
from .forms import DownloadForm, ModelFilters
from .models import Model


def _panel_context(form=None, filters=None):
    architectures = Model.objects.exclude(architecture="").order_by("architecture").values_list("architecture", flat=True).distinct()
    return {"form": form or DownloadForm(), **Model.panel_page(filters=filters), "architectures": list(architectures),
            "sorts": list(ModelFilters.SORT_LABELS.items())}  # fmt: skip


@require_GET
def panel(request):
    """The Models page; its query (?search=, status, format, architecture, sort) narrows the
    list, so a link or a reload keeps what was chosen. A bad value is said above the list,
    which then shows every model."""
    return render(request, "models_app/panel.html", _panel_context(filters=ModelFilters(request.GET)))


@require_POST
def download(request):
    form = DownloadForm(request.POST)
    error = None
    if form.is_valid():
        try:
            services.request_download(
                user=request.user,
                repo_id=form.cleaned_data["repo_id"],
                quantization=form.cleaned_data["quantization"],
                token=form.cleaned_data["access_token"],
                revision=form.cleaned_data["revision"],
                allow_duplicate=form.cleaned_data["allow_duplicate"],
            )
        except ServiceError as exc:
            error = exc
        else:
            if not request.htmx:
                return redirect("models:panel")
            # Repo and token clear, the format stays; the list comes along out-of-band.
            fresh = DownloadForm(initial={"quantization": form.cleaned_data["quantization"]})
            return render(request, "models_app/_download_response.html", {**_panel_context(fresh)})
    status = error.status if error else 422
    context = {**_panel_context(form), "service_error": error}
    if request.htmx:
        return render(request, "models_app/_download_form.html", context, status=status)
    return render(request, "models_app/panel.html", context, status=status)


def _refused_on_card(request, model_id, exc: ServiceError):
    """A refused card action: the card says why; a model gone meanwhile (deleted from
    another tab) loses its card."""
    if not request.htmx:
        return redirect("models:panel")
    if isinstance(exc, NotFound):
        return HttpResponse("")
    model = services.get_model(model_id)
    response = render(request, "models_app/_card.html", {"model": model, "notice": exc.message}, status=exc.status)
    response["HX-Retarget"] = f"#model-card-{model.id}"
    return response


def _card_or_redirect(request, model_id, action):
    try:
        model = action(model_id)
    except ServiceError as exc:
        return _refused_on_card(request, model_id, exc)
    if not request.htmx:
        return redirect("models:panel")
    if not model:  # deleted (or already gone): the card goes
        return HttpResponse("")
    return render(request, "models_app/_card.html", {"model": model})


@require_POST
def cancel(request, model_id):
    return _card_or_redirect(request, model_id, lambda mid: services.cancel_model(mid, request.user))


@require_POST
def delete(request, model_id):
    return _card_or_redirect(request, model_id, lambda mid: services.delete_model(mid, request.user) and None)


@require_POST
def retry(request, model_id):
    """Retry on an error or cancelled card (with a token for a gated repo): the card goes back to queued."""
    token = request.POST.get("access_token") or None
    return _card_or_redirect(request, model_id, lambda mid: services.retry_model(mid, request.user, token))


@require_POST
def verify(request, model_id):
    """"Verify files" on a ready card: it says "Checking…" until the job records the outcome."""
    return _card_or_redirect(request, model_id, lambda mid: services.request_verify(mid, request.user))


@require_POST
def quantize(request, model_id):
    """"Quantize to…" on a ready card: the new record's card joins the list."""
    try:
        services.request_quantize(user=request.user, model_id=model_id, quantization=request.POST.get("quantization", ""))
    except ServiceError as exc:
        return _refused_on_card(request, model_id, exc)
    if not request.htmx:
        return redirect("models:panel")
    return render(request, "models_app/_model_list.html", Model.panel_page(filters=ModelFilters(request.POST)))  # as the page narrows it


@require_GET
def more_models(request):
    """The next page of cards, appended where the "Show more" button was."""
    page = int_param(request, "page", 1, 1, 10**6)  # a bad one is a 400 page (mistudio.hardening)
    return render(request, "models_app/_model_page.html", Model.panel_page(page, ModelFilters(request.GET)))


@require_GET
def architecture(request, model_id):
    try:
        model = services.get_model(model_id)
    except NotFound as exc:
        raise Http404(exc.message) from None
    try:
        view = services.architecture(model_id)
    except ServiceError as exc:
        return render(request, "models_app/_architecture.html", {"model": model, "refusal": exc.message}, status=exc.status)
    raw_config = json.dumps(model.architecture_config, indent=2, sort_keys=True)
    threshold = settings.FIDELITY_COSINE_WARN
    return render(request, "models_app/_architecture.html", {
        "model": model, "view": view, "raw_config": raw_config,
        "chart": charts.fidelity_chart(model.fidelity, threshold), "fidelity_rows": charts.by_layer(model.fidelity, threshold),
    })  # fmt: skip


@require_POST
def estimate(request):
    """Memory and disk per format for the repo typed in the form (no weights fetched)."""
    try:
        figures = services.estimate_repo(
            repo_id=request.POST.get("repo_id", ""),
            revision=request.POST.get("revision") or None,
            token=request.POST.get("access_token") or None,
        )
    except ServiceError as exc:
        return render(request, "models_app/_estimates.html", {"refusal": exc})
    return render(request, "models_app/_estimates.html", {"figures": figures})
