"""One pagination rule for every list endpoint (issue 17): found in the URLconf (every API
route without an id whose answer is a list), each takes `?page=` and `?limit=` the same way:
whole numbers in range or a 400 saying which, a page past the end empty, and the total."""

import pytest

from activations_app.models import Dataset
from models_app.models import Model
from tests.test_route_sweep import route_table

pytestmark = pytest.mark.django_db


def test_every_list_endpoint_pages_the_same_way(signed_in, data_dir):
    for i in range(3):
        Model.objects.create(name=f"m{i}", status="ready")
        Dataset.objects.create(name=f"d{i}", source="local", file_path="")
    lists = []
    for template, names in route_table():
        if not template.startswith("api/") or names or "(?P" in template:
            continue
        response = signed_in.get("/" + template)
        if response.status_code == 200 and "pagination" in response.json():
            lists.append("/" + template)
    assert {"/api/models", "/api/datasets", "/api/extractions"} <= set(lists), lists
    for path in lists:
        whole = signed_in.get(path).json()
        total = whole["pagination"]["total"]
        first = signed_in.get(path, {"limit": 2}).json()
        assert len(first["data"]) == min(2, total) and first["pagination"]["has_next"] == (total > 2), path
        past = signed_in.get(path, {"page": 1000}).json()
        assert past["data"] == [] and past["pagination"]["total"] == total, path
        for bad in ({"page": "abc"}, {"page": "0"}, {"limit": "1000"}, {"limit": "9" * 5000}):
            refused = signed_in.get(path, bad)
            assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_parameter", (path, bad)
