"""What a page's list (and its API collection) is narrowed by: a search over some text
columns, exact filters, and an order. One form per list validates the query for the page,
its socket and the API alike; a bad value is named (the page shows every row and says why,
the API answers 400 with the field), and a search PostgreSQL cannot store (a NUL) is refused
before it reaches the database."""

from __future__ import annotations

from urllib.parse import urlencode

from django import forms
from django.core.exceptions import ValidationError
from django.db.models import F, Max, Min, Q

from .text import UNSTORABLE, storable


class ListFilters(forms.Form):
    """Subclasses add their filter fields and say which columns they read: SEARCH_COLUMNS
    (icontains, any of them), EXACT (field -> column), SORTS (name -> columns, "-" for
    descending, nulls last) with SORT_LABELS in the same order, the first the default."""

    SEARCH_COLUMNS: tuple[str, ...] = ()
    EXACT: dict[str, str] = {}
    SORTS: dict[str, tuple[str, ...]] = {"newest": ("-created_at", "-id")}
    SORT_LABELS: dict[str, str] = {"newest": "Newest first"}

    search = forms.CharField(required=False, max_length=200, strip=True)
    sort = forms.ChoiceField(required=False, choices=[])

    def __init__(self, data=None, **kwargs) -> None:
        super().__init__(data, **kwargs)
        self.fields["sort"].choices = list(self.SORT_LABELS.items())
        for name, field in self.fields.items():
            if isinstance(field, forms.ChoiceField) and field.choices:
                field.error_messages["invalid_choice"] = (
                    f"{name} must be one of {', '.join(str(value) for value, _ in field.choices if value)}."
                )

    def clean(self):
        data = super().clean()
        for name, value in data.items():
            if isinstance(value, str) and not storable(value):
                self.add_error(name, ValidationError(f"{name}: {UNSTORABLE}", code="invalid_parameter"))
        return data

    def problem(self) -> tuple[str, str] | None:
        """(field, message) of the first field at fault, or None."""
        if self.is_valid():
            return None
        name = next((name for name in self.fields if name in self.errors), next(iter(self.errors)))
        return name, self.errors[name][0]

    def apply(self, queryset):
        """The rows these filters keep, in their order (all rows, newest first, when a
        value is bad)."""
        data = self.cleaned_data if self.is_valid() else {}
        search = data.get("search", "")
        if search and self.SEARCH_COLUMNS:
            matches = Q()
            for column in self.SEARCH_COLUMNS:
                matches |= Q(**{f"{column}__icontains": search})
            queryset = queryset.filter(matches)
        for field, column in self.EXACT.items():
            if data.get(field):
                queryset = queryset.filter(**{column: data[field]})
        order = self.SORTS[data.get("sort") or next(iter(self.SORTS))]
        return queryset.order_by(*(F(o[1:]).desc(nulls_last=True) if o.startswith("-") else F(o).asc() for o in order))

    def query(self) -> str:
        """The valid filters as a query string (for links: Show more, the socket, reload)."""
        if not self.is_valid():
            return ""
        default = next(iter(self.SORTS))
        return urlencode({k: v for k, v in self.cleaned_data.items() if v and not (k == "sort" and v == default)})

    @property
    def active(self) -> bool:
        return bool(self.query())


def filtered_page(rows, filters: ListFilters, page: int, size: int, name: str, group_by=None) -> dict:
    """One page of `rows` (a queryset of every row) as `filters` narrow and order them, under
    `name` (the template's: "models", "datasets", "extractions"): with "next_page" (None on
    the last), the filters and their query string, the total and how many match. Every list
    page and its socket render this.

    With `group_by` (an expression naming each row's group), a page is `size` groups, each
    with every one of its rows (oldest first) when any of them matches; groups are ordered as
    their rows would be (by the first row in that order) and counted as one: "groups" holds
    them as lists of rows, `name` all their rows."""
    narrowed = filters.apply(rows)
    start = (page - 1) * size
    if group_by is None:
        found = list(narrowed[start : start + size + 1])
        shown, groups, more = found[:size], None, len(found) > size
        total = rows.count()
        matching = narrowed.count() if filters.active else total
    else:
        aggregates, ordering = _group_order(filters)
        keys = narrowed.order_by().annotate(_group=group_by).values("_group").annotate(**aggregates).order_by(*ordering)
        page_keys = [row["_group"] for row in keys[start : start + size + 1]]
        more, page_keys = len(page_keys) > size, page_keys[:size]
        members: dict = {key: [] for key in page_keys}
        for row in rows.annotate(_group=group_by).filter(_group__in=page_keys).order_by("created_at", "pk"):
            members[row._group].append(row)
        groups = [members[key] for key in page_keys if members[key]]
        shown = [row for group in groups for row in group]
        total = rows.annotate(_group=group_by).values("_group").distinct().count()
        matching = narrowed.annotate(_group=group_by).values("_group").distinct().count() if filters.active else total
    return {name: shown, "groups": groups, "next_page": page + 1 if more else None, "filters": filters,
            "query": filters.query(), "total": total, "matching": matching}  # fmt: skip


def _group_order(filters: ListFilters) -> tuple[dict, list]:
    """The filters' order for groups: each column's largest value in the group where the
    column sorts descending, its smallest where ascending (newest first: the group with the
    newest row first)."""
    data = filters.cleaned_data if filters.is_valid() else {}
    aggregates, ordering = {}, []
    for i, column in enumerate(filters.SORTS[data.get("sort") or next(iter(filters.SORTS))]):
        alias, descending = f"_order{i}", column.startswith("-")
        aggregates[alias] = (Max if descending else Min)(column.lstrip("-"))
        ordering.append(F(alias).desc(nulls_last=True) if descending else F(alias).asc())
    return aggregates, ordering
