"""Every submit twice, and in two tabs: a double-clicked Start starts one run (the page
drops the click while the first is in flight, and the server answers one Idempotency-Key
once, for the API as well), and after Retry in one tab each open tab lists the run once."""

from __future__ import annotations

import json
import threading

import pytest
from django.test import Client

from activations_app import services as extraction_services
from activations_app.models import Extraction, ExtractionStatus
from models_app.tests.test_browser import browser, signed_in_extract_dialog, stack  # noqa: F401 - fixtures

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def dataset(data_dir, user):
    (data_dir / "imports" / "lines.txt").write_text("\n".join(f"Line {i} about the river." for i in range(40)))
    return extraction_services.import_dataset(path=str(data_dir / "imports" / "lines.txt"), user=user)


def start_twice(user, path: str, body: dict, key: str | None) -> list[int]:
    """The same POST from two threads at once, as a double-clicking client sends it."""
    statuses, barrier = [], threading.Barrier(2)

    def send():
        client = Client()
        client.force_login(user)
        headers = {"HTTP_IDEMPOTENCY_KEY": key} if key else {}
        barrier.wait()
        statuses.append(client.post(path, json.dumps(body), content_type="application/json", **headers).status_code)

    threads = [threading.Thread(target=send) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(statuses)


def test_an_api_request_sent_twice_with_one_key_starts_one_run_and_without_one_two(tiny_model, dataset, user, redis_clean):
    path = f"/api/models/{tiny_model.id}/extract"
    body = {"dataset_id": dataset.id, "layers": [0], "hook_types": ["residual"], "max_samples": 4}
    statuses = start_twice(user, path, body, "double-click-1")
    assert Extraction.objects.count() == 1
    assert statuses in ([202, 202], [202, 409])  # the second: the first's answer again, or "in flight"
    # Sent again later with the same key: the first answer, not a second run.
    again = Client()
    again.force_login(user)
    replay = again.post(path, json.dumps(body), content_type="application/json", HTTP_IDEMPOTENCY_KEY="double-click-1")
    assert replay.status_code == 202 and replay.json()["id"] == Extraction.objects.get().id
    # Without a key the server cannot tell a double click from two requests: two runs.
    assert start_twice(user, path, body, None) == [202, 202]
    assert Extraction.objects.count() == 3
    # A refusal does not keep the key: the corrected request goes through with it.
    bad = again.post(path, json.dumps({**body, "layers": [99]}), content_type="application/json", HTTP_IDEMPOTENCY_KEY="k2")
    assert bad.status_code == 400
    good = again.post(path, json.dumps(body), content_type="application/json", HTTP_IDEMPOTENCY_KEY="k2")
    assert good.status_code == 202 and Extraction.objects.count() == 4


@pytest.mark.browser
def test_a_double_clicked_start_starts_one_run_and_start_stays_off(stack, browser, user, tiny_model, data_dir):  # noqa: F811
    page, _dataset = signed_in_extract_dialog(browser, stack, user, tiny_model, data_dir)
    page.click(".layer-toggle:has-text('L3')")
    page.fill("#id_max_samples", "4")
    page.wait_for_selector(".estimate-storage", timeout=15_000)
    page.evaluate("window.__noReload = true")
    page.dblclick("#start-extraction")
    page.wait_for_selector("#start-status .extract-started", timeout=15_000)
    assert page.is_disabled("#start-extraction")
    page.wait_for_timeout(1_000)  # time for a second request, had one gone out
    assert Extraction.objects.filter(model_id=tiny_model.id).count() == 1


@pytest.mark.browser
def test_retry_in_one_tab_leaves_one_card_in_every_tab(stack, browser, user, tiny_model, dataset):  # noqa: F811
    from tests.test_action_sweep import session_cookie

    failed = extraction_services.request_extraction(model_id=tiny_model.id, dataset_id=dataset.id, enqueue=False, user=user,
                                                    layers=[0], hook_types=["residual"], max_samples=4, seq_len=8)  # fmt: skip
    Extraction.objects.filter(pk=failed.pk).update(status=ExtractionStatus.FAILED, error_code="worker_died")
    context = browser.new_context()
    context.add_cookies([session_cookie(user, stack)])
    tabs = [context.new_page(), context.new_page()]  # A: the run's own page; B: the list
    for tab, url in zip(tabs, (f"/extractions/{failed.id}", "/extractions/"), strict=True):
        tab.goto(stack + url)
        tab.wait_for_selector("#connection-status[data-state=connected]", timeout=15_000)
    card = f"#extraction-card-{failed.id}"
    for round_ in range(2):  # retried twice: the second retry is where three copies showed
        tabs[0].click(f"{card} button:has-text('Retry')")
        tabs[0].wait_for_load_state("load")
        for tab in tabs:  # the worker runs it again, to the end, and both tabs follow
            tab.wait_for_selector(f"{card}[data-status=completed]", timeout=60_000)
            tab.wait_for_timeout(300)
            assert tab.locator(card).count() == 1, f"round {round_}"
        Extraction.objects.filter(pk=failed.pk).update(status=ExtractionStatus.FAILED, error_code="worker_died")
        Extraction.objects.get(pk=failed.pk).publish()
        for tab in tabs:
            tab.wait_for_selector(f"{card}[data-status=failed]", timeout=10_000)
    context.close()
