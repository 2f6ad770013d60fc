from django import forms
from django.core.exceptions import ValidationError

from mistudio.errors import InvalidInput
from mistudio.validation import validate_repo_id, validate_revision

from .ml.formats import validate_format

QUANTIZATION_CHOICES = [
    ("FP32", "FP32 (Full Precision)"),
    ("FP16", "FP16 (Half Precision)"),
    ("Q8", "Q8 (8-bit)"),
    ("Q4", "Q4 (4-bit)"),
    ("Q2", "Q2 (2-bit)"),
]


def _checked(validator, value):
    try:
        return validator(value)
    except InvalidInput as exc:
        raise ValidationError(exc.message, code=exc.code) from None


class DownloadForm(forms.Form):
    repo_id = forms.CharField(required=False, strip=False)
    quantization = forms.ChoiceField(choices=QUANTIZATION_CHOICES, initial="Q4")
    access_token = forms.CharField(required=False, widget=forms.PasswordInput(render_value=False))
    revision = forms.CharField(required=False, strip=False)
    allow_duplicate = forms.BooleanField(required=False)

    def clean_repo_id(self):
        return _checked(validate_repo_id, self.cleaned_data["repo_id"])

    def clean_quantization(self):
        return _checked(validate_format, self.cleaned_data["quantization"])

    def clean_revision(self):
        return _checked(validate_revision, self.cleaned_data["revision"])


SORTS = {"newest": ("-created_at", "-id"), "oldest": ("created_at", "id"), "name": ("name", "-created_at", "-id"),
         "size": ("-disk_size_bytes", "-created_at", "-id")}  # fmt: skip
SORT_LABELS = {"newest": "Newest first", "oldest": "Oldest first", "name": "Name", "size": "Largest on disk"}


class ModelFilters(forms.Form):
    """What the Models page and GET /api/models narrow the list by: a search over name, repo
    and architecture, status, format, architecture, and the order. Every field optional; an
    unknown choice or an unstorable search is refused with the field's name."""

    search = forms.CharField(required=False, max_length=200, strip=True)
    status = forms.ChoiceField(required=False, choices=[])
    format = forms.ChoiceField(required=False, choices=[("", "Any format"), *QUANTIZATION_CHOICES])
    architecture = forms.CharField(required=False, max_length=40, strip=True)
    sort = forms.ChoiceField(required=False, choices=list(SORT_LABELS.items()))

    def __init__(self, data=None, **kwargs) -> None:
        from .models import ModelStatus

        super().__init__(data, **kwargs)
        self.fields["status"].choices = [("", "Any status"), *ModelStatus.choices]
        self.fields["status"].error_messages["invalid_choice"] = f"status must be one of {', '.join(ModelStatus.values)}."
        self.fields["format"].error_messages["invalid_choice"] = f"format must be one of {', '.join(c for c, _ in QUANTIZATION_CHOICES)}."
        self.fields["sort"].error_messages["invalid_choice"] = f"sort must be one of {', '.join(SORTS)}."

    def clean_search(self) -> str:
        from mistudio.text import UNSTORABLE, storable

        value = self.cleaned_data["search"]
        if not storable(value):
            raise ValidationError(f"search: {UNSTORABLE}", code="invalid_parameter")
        return value

    def clean_architecture(self) -> str:
        from mistudio.text import UNSTORABLE, storable

        value = self.cleaned_data["architecture"]
        if not storable(value):
            raise ValidationError(f"architecture: {UNSTORABLE}", code="invalid_parameter")
        return value

    def problem(self) -> tuple[str, str] | None:
        """(field, message) of the first field at fault, or None."""
        if self.is_valid():
            return None
        name = next(name for name in self.fields if name in self.errors)
        return name, self.errors[name][0]

    def apply(self, queryset):
        """The rows these filters keep, in their order (valid filters only; else all rows)."""
        data = self.cleaned_data if self.is_valid() else {}
        search = data.get("search", "")
        if search:
            from django.db.models import Q

            queryset = queryset.filter(Q(name__icontains=search) | Q(repo_id__icontains=search) | Q(architecture__icontains=search))
        for field, column in (("status", "status"), ("format", "quantization"), ("architecture", "architecture")):
            if data.get(field):
                queryset = queryset.filter(**{column: data[field]})
        from django.db.models import F

        order = SORTS[data.get("sort") or "newest"]
        return queryset.order_by(*(F(o[1:]).desc(nulls_last=True) if o.startswith("-") else F(o).asc() for o in order))

    def query(self) -> str:
        """The valid filters as a query string (for links: Show more, the socket, reload)."""
        from urllib.parse import urlencode

        if not self.is_valid():
            return ""
        return urlencode({k: v for k, v in self.cleaned_data.items() if v and not (k == "sort" and v == "newest")})

    @property
    def active(self) -> bool:
        return bool(self.query())
