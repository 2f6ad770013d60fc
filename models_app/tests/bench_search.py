"""Finding a model among 10,000 (prints a table; not a test): server time of the Models
page's first load and of each keystroke's answer (the page asked again with the search so
far, as the search box does), through Django's test client against PostgreSQL. Issue 19's
targets: first page < 300 ms, each keystroke < 150 ms p95. The same for GET /api/models."""

from __future__ import annotations

import statistics
import time

import pytest

from models_app.tests.bench_models import report
from models_app.tests.test_model_search import MANY, many_models


def timed(client, path: str, params: dict) -> float:
    started = time.perf_counter()
    response = client.get(path, params)
    seconds = time.perf_counter() - started
    assert response.status_code == 200
    return seconds


@pytest.mark.django_db(transaction=True)
def test_search_latency_table(signed_in):
    many_models(MANY)
    timed(signed_in, "/", {})  # warm: templates, the first connection
    first = [timed(signed_in, "/", {}) for _ in range(10)]
    keystrokes = [term[:n] for term in ("org-42/model-0", "model-09876", "qwen", "del-01234") for n in range(1, len(term) + 1)]
    typed = [timed(signed_in, "/", {"search": text}) for text in keystrokes for _ in range(3)]
    combined = [timed(signed_in, "/", {"search": "model", "architecture": "gemma2", "format": "Q4", "status": "ready", "sort": "size"})
                for _ in range(10)]  # fmt: skip
    api = [timed(signed_in, "/api/models", {"search": text}) for text in keystrokes]

    def p95(values):
        return statistics.quantiles(values, n=20)[-1]

    rows = [
        ("Models page, first load (median of 10)", f"{statistics.median(first) * 1000:6.1f} ms   target < 300 ms"),
        (f"each keystroke's answer ({len(typed)} answers), p95", f"{p95(typed) * 1000:6.1f} ms   target < 150 ms (median {statistics.median(typed) * 1000:.1f} ms)"),
        ("search + three filters + sort by size (median of 10)", f"{statistics.median(combined) * 1000:6.1f} ms"),
        ("GET /api/models?search= per keystroke, p95", f"{p95(api) * 1000:6.1f} ms"),
    ]
    report(f"Finding a model among {MANY:,} (server time, Django test client, PostgreSQL)", rows)
