from django import forms
from django.core.exceptions import ValidationError

from mistudio.errors import InvalidInput
from mistudio.filters import ListFilters
from mistudio.validation import validate_repo_id, validate_revision

from .ml.formats import validate_format
from .models import ModelStatus

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


class ModelFilters(ListFilters):
    """The Models page's and GET /api/models' filters (mistudio.filters): search over name,
    repo id and architecture; status, format, architecture; newest, oldest, name or size."""

    SEARCH_COLUMNS = ("name", "repo_id", "architecture")
    EXACT = {"status": "status", "format": "quantization", "architecture": "architecture"}
    SORTS = {"newest": ("-created_at", "-id"), "oldest": ("created_at", "id"), "name": ("name", "-created_at", "-id"),
             "size": ("-disk_size_bytes", "-created_at", "-id")}  # fmt: skip
    SORT_LABELS = {"newest": "Newest first", "oldest": "Oldest first", "name": "Name", "size": "Largest on disk"}

    status = forms.ChoiceField(required=False, choices=[("", "Any status"), *ModelStatus.choices])
    format = forms.ChoiceField(required=False, choices=[("", "Any format"), *QUANTIZATION_CHOICES])
    architecture = forms.CharField(required=False, max_length=40, strip=True)
