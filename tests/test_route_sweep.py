"""Every route in the URLconf × one shared hostile corpus, generated: a route, a query
parameter, a form field or a JSON field added tomorrow is swept the day it lands.

The routes come from the resolver (every app's, the admin's and the floor's). The fields
each route reads are found by asking it: a first pass sends each route a plain request
while the request's dicts (query, form, files, JSON body) record every key the code looks
up; keys found are filled and the route asked again, until no new key turns up. Then every
path parameter, and every field in the carrier the route reads (query for GET, JSON for
/api/ POSTs, a form elsewhere), gets every value of the corpus, and each route also gets
unknown and missing fields, a 10 MB body, JSON nested 200,000 deep and a body that claims
2 GB. What must hold: never a 5xx; on /api/ every 4xx is the JSON error shape; and no row,
folder or queued job appears."""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from urllib.parse import quote

import pytest
from django.apps import apps
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from django.core.handlers.wsgi import WSGIRequest
from django.db import transaction
from django.http import QueryDict
from django.utils.datastructures import MultiValueDict

import mistudio.api

pytestmark = pytest.mark.django_db

SURROGATE = "\ud800"
# One corpus for every field: (name, value for a query or a form, value for JSON).
CORPUS = [
    ("5,000 digits", "9" * 5000, None),  # JSON: a literal number of 5,000 digits (below)
    ("negative", "-1", -1),
    ("huge negative", "-" + "9" * 40, -(10**40)),
    ("float", "2.5", 2.5),
    ("NaN", "NaN", None),  # JSON: the NaN literal Python's json accepts
    ("true", "true", True),
    ("null", "null", None),
    ("list", ["1", "2"], [1, 2]),
    ("object", '{"a": 1}', {"a": 1}),
    ("NUL", "a\x00b", "a\x00b"),
    ("lone surrogate", SURROGATE, SURROGATE),
    ("1 MB", "x" * 1_000_000, "x" * 1_000_000),
    ("empty", "", ""),
]
JSON_LITERALS = {"5,000 digits": "9" * 5000, "NaN": "NaN", "null": "null"}


def _encode(value: str) -> str:
    return quote(value.encode("utf-8", "surrogatepass"), safe="")


def form_body(fields: dict) -> str:
    """URL-encoded by hand: the test client refuses lone surrogates, a browser does not."""
    pairs = []
    for key, value in fields.items():
        for item in value if isinstance(value, list) else [value]:
            pairs.append(f"{_encode(key)}={_encode(item)}")
    return "&".join(pairs)


def json_body(fields: dict, literal: dict | None = None) -> str:
    """JSON with `literal` values written as given (an over-long number, NaN)."""
    marked = {key: f"@@{key}@@" if literal and key in literal else value for key, value in fields.items()}
    text = json.dumps(marked)  # a lone surrogate as its \\ud800 escape, which JSON allows
    for key, raw in (literal or {}).items():
        text = text.replace(json.dumps(f"@@{key}@@"), raw)
    return text


# --- the routes, from the resolver ------------------------------------------------------

PARAMETER = re.compile(r"<(?:(?P<converter>\w+):)?(?P<name>\w+)>|\(\?P<(?P<group>\w+)>[^()]*(?:\([^()]*\)[^()]*)*\)")


def walk(patterns, prefix=""):
    for entry in patterns:
        if isinstance(entry, URLResolver):
            yield from walk(entry.url_patterns, prefix + str(entry.pattern))
        elif isinstance(entry, URLPattern):
            yield prefix + str(entry.pattern), entry


def route_table():
    """(template, parameter names) for every route, its regex anchors dropped."""
    table = []
    for template, _entry in walk(get_resolver().url_patterns):
        clean = template.replace("^", "").replace("$", "").replace("\\Z", "")
        names = [m.group("name") or m.group("group") for m in PARAMETER.finditer(clean)]
        table.append((clean, names))
    return table


def fill(template: str, values: dict[str, str]) -> str:
    def one(match):
        return _encode(values[match.group("name") or match.group("group")])

    return "/" + PARAMETER.sub(one, template)


def real_ids() -> dict[str, str]:
    """A parameter named `<something>_id` takes the id of a row of the app model whose name
    ends with `something` (template_id: an ExtractionTemplate)."""
    found = {}
    for model in apps.get_models():
        if model._meta.app_label not in ("models_app", "activations_app"):
            continue
        row = model.objects.order_by("pk").first()
        if row is not None:
            found[model._meta.model_name] = str(row.pk)
    return found


def value_for(name: str, ids: dict[str, str]) -> str:
    stem = name.removesuffix("_id").replace("_", "")
    return next((pk for model_name, pk in ids.items() if model_name.endswith(stem)), "x")


# --- field discovery ------------------------------------------------------------------


class Recorder:
    """The keys the code looks up in a request's query, form, files and JSON body while the
    request is answered (the resolver's own MultiValueDicts are left out)."""

    LOOKUPS = ("get", "getlist", "__getitem__", "__contains__")

    def __init__(self, monkeypatch):
        self.keys: set[str] = set()
        recorder = self

        def recording(cls):
            for method in self.LOOKUPS:
                original = getattr(cls, method)

                def lookup(self_, key, *args, _original=original, **kwargs):
                    if isinstance(key, str):
                        recorder.keys.add(key)
                    return _original(self_, key, *args, **kwargs)

                monkeypatch.setattr(cls, method, lookup)

        recording(QueryDict)

        class RecordingFiles(MultiValueDict):
            pass

        recording(RecordingFiles)
        files = WSGIRequest.FILES

        def recorded_files(request):
            found = files.fget(request)
            if not isinstance(found, RecordingFiles):
                found = request._files = RecordingFiles(dict(found.lists()))
            return found

        monkeypatch.setattr(WSGIRequest, "FILES", property(recorded_files))

        class RecordingDict(dict):
            def get(self, key, default=None):
                recorder.keys.add(key)
                return super().get(key, default)

            def __getitem__(self, key):
                recorder.keys.add(key)
                return super().__getitem__(key)

            def __contains__(self, key):
                recorder.keys.add(key)
                return super().__contains__(key)

        original_loads = mistudio.api.json.loads

        class RecordingJson:
            @staticmethod
            def loads(*args, **kwargs):
                body = original_loads(*args, **kwargs)
                return RecordingDict(body) if isinstance(body, dict) else body

        monkeypatch.setattr(mistudio.api, "json", RecordingJson)

    def take(self) -> set[str]:
        keys, self.keys = self.keys, set()
        return keys


# Keys every request's plumbing reads (CSRF, htmx, the duplicate guard): swept on their own
# rows below, not counted as the route's fields.
PLUMBING = {"csrfmiddlewaretoken", "HTTP_X_CSRFTOKEN", "idempotency_key"}


def send(client, method: str, path: str, carrier: str, fields: dict, literal: dict | None = None, **extra):
    if method == "GET":
        query = form_body(fields)
        return client.get(path, QUERY_STRING=query, **extra) if query else client.get(path, **extra)
    if carrier == "json":
        return client.post(path, json_body(fields, literal), content_type="application/json", **extra)
    return client.post(path, form_body(fields), content_type="application/x-www-form-urlencoded", **extra)


def discover(client, recorder, method, path, carrier) -> set[str]:
    known: set[str] = set()
    for _round in range(4):
        recorder.take()
        send(client, method, path, carrier, {key: "x" for key in known})
        new = {key for key in recorder.take() if isinstance(key, str)} - PLUMBING - known
        if not new:
            break
        known |= new
    return known


# --- what must hold -------------------------------------------------------------------


def state(data_dir, redis) -> tuple:
    rows = tuple((model._meta.label, model.objects.count()) for model in apps.get_models()
                 if model._meta.app_label in ("models_app", "activations_app"))  # fmt: skip
    files = tuple(sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*")))
    queued = tuple(sorted((key.decode(), redis.llen(key)) for key in redis.keys("rq:queue:*")))
    return rows, files, queued


def judge(response, path: str, what: str, problems: list[str]) -> None:
    status = response.status_code
    if status >= 500:
        exc = getattr(response, "exc_info", None)
        problems.append(f"{status} {what} {path[:120]}" + (f" ({exc[0].__name__}: {str(exc[1])[:150]})" if exc else ""))
    elif path.startswith("/api/") and 400 <= status < 500:
        try:
            error = response.json()["error"]
            assert error["code"] and error["message"]
        except Exception:  # noqa: BLE001 - any shape but the API's is the finding
            problems.append(f"{status} without the JSON error shape: {what} {path[:120]}")


def restore(data_dir, pristine) -> None:
    shutil.rmtree(data_dir)
    shutil.copytree(pristine, data_dir, symlinks=True)


def sweep_route(client, method, template, names, ids, carrier, fields, problems) -> int:
    """Every hostile value in every path parameter and field of one route; the count sent."""
    sent = 0
    path = fill(template, {name: value_for(name, ids) for name in names})
    for name in names:
        for label, value, _ in CORPUS:
            if isinstance(value, list) or len(value) > 100_000:
                continue  # a path segment is one string; a long address is the 414 test's
            hostile = fill(template, {**{n: value_for(n, ids) for n in names}, name: value or "x"})
            judge(send(client, method, hostile, carrier, {}), hostile, f"{method} {name}={label}", problems)
            sent += 1
    for field in sorted(fields):
        for label, value, as_json in CORPUS:
            literal = {field: JSON_LITERALS[label]} if carrier == "json" and label in JSON_LITERALS else None
            judge(send(client, method, path, carrier, {field: as_json if carrier == "json" else value}, literal),
                  path, f"{method} {field}={label}", problems)  # fmt: skip
            sent += 1
    every = {field: "9" * 5000 for field in fields} | {"unknown_field": "x"}
    judge(send(client, method, path, carrier, every), path, f"{method} every field at once, and an unknown one", problems)
    sent += 1
    if method == "POST" and fields:  # a route that reads a body: its size and depth limits
        judge(client.post(path, "a=" + "b" * 10_000_000, content_type="application/x-www-form-urlencoded"), path, "10 MB body", problems)
        judge(client.post(path, "[" * 200_000 + "]" * 200_000, content_type="application/json"), path, "JSON 200,000 deep", problems)
        claims = client.post(path, "x", content_type="application/octet-stream", CONTENT_LENGTH="2000000000")
        judge(claims, path, "a body that claims 2 GB", problems)
        if claims.status_code != 413:
            problems.append(f"{claims.status_code} (not 413) for a body that claims 2 GB: {path}")
        sent += 3
    return sent


@pytest.fixture
def records(smollm2_model, data_dir, user, redis_clean):
    """One row of every kind, so routes with an id reach past their lookup."""
    from activations_app import services as extraction_services
    from activations_app.models import ExtractionStatus

    (data_dir / "imports" / "lines.txt").write_text("\n".join(f"Line {i} of the sweep." for i in range(20)))
    dataset = extraction_services.import_dataset(path=str(data_dir / "imports" / "lines.txt"), user=user)
    extraction = extraction_services.request_extraction(model_id=smollm2_model.id, dataset_id=dataset.id, enqueue=False,
                                                        layers=[0], hook_types=["residual"], max_samples=4, user=user)  # fmt: skip
    type(extraction).objects.filter(pk=extraction.pk).update(status=ExtractionStatus.FAILED, error_code="worker_died")
    from activations_app.models import Export

    Export.objects.create(extraction=extraction, out_path=str(extraction.final_dir / "saelens"), owner=user,
                          status="failed", error_code="worker_died")  # fmt: skip
    extraction_services.save_template(user=user, name="sweep", model_id=smollm2_model.id,
                                      data={"layers": [0], "hook_types": ["residual"], "dataset_id": dataset.id})  # fmt: skip
    return redis_clean


def test_every_route_answers_every_hostile_value_without_a_5xx_or_a_trace(records, user, data_dir, monkeypatch, settings, tmp_path):
    settings.HF_ENDPOINT = "http://127.0.0.1:9"  # nothing listens: a Hub call fails at once
    client = Client(raise_request_exception=False)  # a view's exception is the 500 a user would get
    recorder = Recorder(monkeypatch)
    ids = real_ids()
    table = route_table()
    problems: list[str] = []
    counts = defaultdict(int)
    pristine = tmp_path / "pristine"
    shutil.copytree(data_dir, pristine, symlinks=True)
    for template, names in table:
        path = fill(template, {name: value_for(name, ids) for name in names})
        for method in ("GET", "POST"):
            client.force_login(user)  # again: the sweep's own POST to /logout/ signs it out
            carrier = "query" if method == "GET" else ("json" if path.startswith("/api/") else "form")
            with transaction.atomic():
                # Asking a route what it reads may act for real (a plain POST to .../delete
                # deletes): rolled back, and the data dir put back, after this route.
                fields = discover(client, recorder, method, path, carrier)
                counts["routes × methods"] += 1
                counts["fields"] += len(fields)
                before = state(data_dir, records)
                counts["requests"] += sweep_route(client, method, template, names, ids, carrier, fields, problems)
                if state(data_dir, records) != before:
                    problems.append(f"hostile input changed what is stored: {method} {template}")
                transaction.set_rollback(True)
            restore(data_dir, pristine)
    print(f"\nroute sweep: {len(table)} routes, {counts['routes × methods']} route×method pairs, "
          f"{counts['fields']} fields found by asking, {len(CORPUS)} hostile values, {counts['requests']:,} requests")  # fmt: skip
    assert not problems, f"{len(problems)} answers broke the rules:\n" + "\n".join(problems[:60])
    assert counts["fields"] >= 20  # discovery works: the forms and API bodies were found
