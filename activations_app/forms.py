"""The extraction request, validated once: the dialog posts it, the API and the command
feed it the same way, and a valid form gives the ExtractionSpec the job runs."""

from __future__ import annotations

from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError

from mistudio.errors import InvalidInput, ServiceError
from mistudio.filters import ListFilters
from mistudio.validation import OUT_OF_RANGE, bounded_int

from .ml.extract import STORAGE_DTYPES, ExtractionSpec
from .ml.tokens import PREPEND_BOS, SEPARATORS, TOKENIZATIONS
from .ml.hooks import HOOK_TYPES
from .ml.outliers import OUTLIER_RULES
from .models import Dataset, DatasetStatus, ExtractionStatus

INPUT_CSS = "w-full px-4 py-2 bg-slate-900 border border-slate-700 rounded-lg text-sm"


def _as_list(value) -> list:
    if value in (None, ""):
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


class WholeNumberField(forms.Field):
    """1 to `maximum` (a setting's name, or the form sets it), as ASCII digits or a JSON
    integer: 2.5, true, "²" and "１" are refused, with the field's name in the message."""

    widget = forms.NumberInput

    def __init__(self, *, maximum_setting: str | None = None, **kwargs) -> None:
        self.maximum_setting = maximum_setting
        self.maximum: int | None = None
        super().__init__(required=False, **kwargs)

    def bound(self) -> int:
        return self.maximum or getattr(settings, self.maximum_setting)

    def clean(self, value):
        try:
            value = bounded_int(value, self.name, 1, self.bound())
        except InvalidInput as exc:
            raise ValidationError(exc.message, code="invalid_input") from None
        return ExtractionSpec.default(self.name) if value is None else value


class ExtractionForm(forms.Form):
    layers = forms.Field(required=False, widget=forms.MultipleHiddenInput)
    hook_types = forms.Field(required=False, widget=forms.MultipleHiddenInput)
    # The settings the dialog shows, in its order; the command offers each as --name-with-dashes.
    batch_size = WholeNumberField(maximum_setting="EXTRACTION_MAX_BATCH_SIZE", label="Batch Size")
    max_samples = WholeNumberField(maximum_setting="EXTRACTION_MAX_SAMPLES", label="Max Samples")
    seq_len = WholeNumberField(label="Sequence Length")  # bounded by the model's positions
    dtype = forms.ChoiceField(
        choices=[(name, name) for name in STORAGE_DTYPES], required=False, label="Storage dtype",
        error_messages={"invalid_choice": "dtype must be float16 or float32."},
    )  # fmt: skip
    tokenization = forms.ChoiceField(
        choices=list(TOKENIZATIONS.items()), required=False, label="Tokenization",
        error_messages={"invalid_choice": "tokenization must be packed or truncate."},
    )  # fmt: skip

    prepend_bos = forms.ChoiceField(
        choices=list(PREPEND_BOS.items()), required=False, label="Prepend BOS",
        error_messages={"invalid_choice": "prepend_bos must be auto, always or never."},
    )  # fmt: skip

    separator = forms.ChoiceField(
        choices=list(SEPARATORS.items()), required=False, label="Between packed documents",
        error_messages={"invalid_choice": "separator must be bos or eos."},
    )  # fmt: skip

    outlier_factor = WholeNumberField(label="Outlier: norm above N x the median")
    outliers = forms.ChoiceField(
        choices=list(OUTLIER_RULES.items()), required=False, label="Outlier tokens",
        error_messages={"invalid_choice": "outliers must be keep or exclude."},
    )  # fmt: skip

    SETTINGS = ("batch_size", "max_samples", "seq_len", "dtype", "tokenization", "prepend_bos", "separator",
                "outlier_factor", "outliers")  # fmt: skip
    OUTLIER_FACTOR_MAX = 10_000

    def __init__(self, data=None, *, model, **kwargs) -> None:
        super().__init__(data, **kwargs)
        self.model = model
        self.num_layers = model.num_layers
        self.fields["seq_len"].maximum = model.max_positions or 2048
        self.fields["seq_len"].label = f"Sequence Length (max {self.fields['seq_len'].maximum})"
        self.fields["outlier_factor"].maximum = self.OUTLIER_FACTOR_MAX
        for name in self.SETTINGS:
            field = self.fields[name]
            field.name = name  # its messages name it as the API and the command do
            field.initial = ExtractionSpec.default(name)
            field.widget.attrs["class"] = INPUT_CSS
            if isinstance(field, WholeNumberField):
                field.widget.attrs.update({"class": f"{INPUT_CSS} font-mono", "min": 1, "max": field.bound()})

    @property
    def settings_fields(self):
        return [self[name] for name in self.SETTINGS]

    def clean_layers(self) -> list[int]:
        raw = _as_list(self.cleaned_data["layers"])
        if not raw:
            raise ValidationError("Choose at least one layer.", code="invalid_layers")
        last = self.num_layers - 1
        layers = []
        for value in raw:
            try:
                layer = bounded_int(value, "layers", 0, last)
            except InvalidInput as exc:
                if exc.code != OUT_OF_RANGE:
                    raise ValidationError("Layers must be whole numbers.", code="invalid_layers") from None
                shown = value if len(str(value)) <= 20 else f"{str(value)[:12]}…"
                raise ValidationError(f"Layer {shown} is out of range 0–{last}.", code="invalid_layers") from None
            if layer is None:  # an empty entry in the list ("", null)
                raise ValidationError("Layers must be whole numbers.", code="invalid_layers")
            layers.append(layer)
        if len(set(layers)) != len(layers):
            raise ValidationError("Each layer may be chosen once.", code="invalid_layers")
        return sorted(layers)

    def clean_hook_types(self) -> list[str]:
        hooks = _as_list(self.cleaned_data["hook_types"])
        if not hooks or any(h not in HOOK_TYPES for h in hooks) or len(set(hooks)) != len(hooks):
            raise ValidationError(f"Hook types must be some of {', '.join(HOOK_TYPES)}.", code="invalid_hooks")
        return [h for h in HOOK_TYPES if h in hooks]

    def clean_dtype(self) -> str:
        return self.cleaned_data["dtype"] or ExtractionSpec.default("dtype")

    def clean_tokenization(self) -> str:
        return self.cleaned_data["tokenization"] or ExtractionSpec.default("tokenization")

    def clean_prepend_bos(self) -> str:
        return self.cleaned_data["prepend_bos"] or ExtractionSpec.default("prepend_bos")

    def clean_separator(self) -> str:
        return self.cleaned_data["separator"] or ExtractionSpec.default("separator")

    def clean_outliers(self) -> str:
        return self.cleaned_data["outliers"] or ExtractionSpec.default("outliers")

    def spec(self) -> ExtractionSpec:
        """The validated request, or a ServiceError naming the first field at fault."""
        if not self.is_valid():
            name, errors = next((name, self.errors.as_data()[name]) for name in self.fields if name in self.errors)
            error = errors[0]
            code = error.code if error.code in ("invalid_layers", "invalid_hooks") else "invalid_input"
            raise ServiceError(code, error.messages[0], details={"field": name})
        return ExtractionSpec(**{name: self.cleaned_data[name] for name in ExtractionSpec.request_fields()})


class DatasetFilters(ListFilters):
    """The Datasets page's and GET /api/datasets' filters (mistudio.filters): search over
    name, repo id and text column; status, source; newest, oldest, name or most rows."""

    SEARCH_COLUMNS = ("name", "repo_id", "text_column")
    EXACT = {"status": "status", "source": "source"}
    SORTS = {"newest": ("-created_at", "-id"), "oldest": ("created_at", "id"), "name": ("name", "-created_at", "-id"),
             "rows": ("-row_count", "-created_at", "-id")}  # fmt: skip
    SORT_LABELS = {"newest": "Newest first", "oldest": "Oldest first", "name": "Name", "rows": "Most rows"}

    status = forms.ChoiceField(required=False, choices=[("", "Any status"), *DatasetStatus.choices])
    source = forms.ChoiceField(required=False, choices=[("", "Any source"), *Dataset.SOURCES])


class ExtractionFilters(ListFilters):
    """The Extractions page's and GET /api/extractions' filters (mistudio.filters): search
    over the id and what it was made from (model and dataset labels); status, model,
    dataset; newest or oldest."""

    SEARCH_COLUMNS = ("id", "model_label", "dataset_label")
    EXACT = {"status": "status", "model_id": "model_id", "dataset_id": "dataset_id"}
    SORTS = {"newest": ("-created_at", "-id"), "oldest": ("created_at", "id")}
    SORT_LABELS = {"newest": "Newest first", "oldest": "Oldest first"}

    status = forms.ChoiceField(required=False, choices=[("", "Any status"), *ExtractionStatus.choices])
    model_id = forms.CharField(required=False, max_length=40, strip=True)
    dataset_id = forms.CharField(required=False, max_length=40, strip=True)

    def narrowing(self) -> str:
        """The query without model_id: what narrows a model's own history further (a new
        card of that model may not match it)."""
        from urllib.parse import parse_qsl, urlencode

        return urlencode([(k, v) for k, v in parse_qsl(self.query()) if k != "model_id"])
