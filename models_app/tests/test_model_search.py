"""Finding a model among ten thousand, and a dataset among hundreds (issue 19, item 1, Models and Datasets): search over
name, repo and architecture, filters by status, format and architecture, sort, a count; the
state in the URL (a link or a reload keeps it); the same through the API; and in Chromium,
typing a fragment of a repo id narrows the list to it, at 390 and 1,280 px."""

from __future__ import annotations

import html
import time

import pytest

from models_app.models import Model
from models_app.tests.test_browser import browser, sign_in, stack  # noqa: F401 - fixtures

pytestmark = pytest.mark.django_db(transaction=True)
MANY = 10_000
FAMILIES = ("llama", "qwen2", "gpt_neox", "gemma2", "mistral")
FORMATS = ("FP32", "FP16", "Q8", "Q4", "Q2")


def many_models(n: int = MANY) -> None:
    """n models: org-{i % 97}/model-{i:05d}, their architecture, format and status by turns,
    sizes growing with i; the newest is the last made."""
    from django.utils import timezone

    now = timezone.now()
    rows = [Model(id=f"m_{i:012x}", name=f"model-{i:05d}", repo_id=f"org-{i % 97}/model-{i:05d}", architecture=FAMILIES[i % 5],
                  quantization=FORMATS[(i // 5) % 5], status="ready" if i % 7 else "error", disk_size_bytes=1000 + i,
                  created_at=now - timezone.timedelta(seconds=n - i))
            for i in range(n)]  # fmt: skip
    Model.objects.bulk_create(rows, batch_size=2000)


def test_search_filters_sort_and_count_over_ten_thousand_models_on_the_page_and_the_api(signed_in):
    many_models()
    page = html.unescape(signed_in.get("/").content.decode())
    assert f"{MANY:,} models" in page and page.count('id="model-card-') == Model.PANEL_SIZE
    # A fragment of one repo id: that model, first page, and the count says so.
    started = time.perf_counter()
    response = signed_in.get("/", {"search": "del-01234"})
    seconds = time.perf_counter() - started
    found = html.unescape(response.content.decode())
    assert 'id="model-card-m_0000000004d2"' in found and found.count('id="model-card-') == 1
    assert f"1 of {MANY:,} models match" in found and 'value="del-01234"' in found
    print(f"\nsearch over {MANY:,} models: {seconds * 1000:.0f} ms for the whole page (test client, server side)")
    # Filters and sort combine; the Show more link keeps them.
    query = {"architecture": "qwen2", "format": "Q4", "status": "error", "sort": "size"}
    expected = [i for i in range(MANY) if FAMILIES[i % 5] == "qwen2" and FORMATS[(i // 5) % 5] == "Q4" and i % 7 == 0]
    combined = html.unescape(signed_in.get("/", query).content.decode())
    assert f"{len(expected):,} of {MANY:,} models match" in combined
    cards = [int(part.split('"')[0], 16) for part in combined.split('id="model-card-m_')[1:]]
    assert cards == sorted(expected, reverse=True)[: Model.PANEL_SIZE]  # largest on disk first
    assert "architecture=qwen2" in combined.split('id="more-models"')[1].split(">")[0] if len(expected) > Model.PANEL_SIZE else True
    # The API answers the same rows, with the total of the matching ones.
    api = signed_in.get("/api/models", {**query, "limit": 100}).json()
    assert api["pagination"]["total"] == len(expected)
    assert [int(row["id"][2:], 16) for row in api["data"]] == sorted(expected, reverse=True)[:100]
    # A bad value: the page says so and shows every model; the API refuses it with its field.
    bad = html.unescape(signed_in.get("/", {"status": "nonsense"}).content.decode())
    assert "status must be one of" in bad and f"{MANY:,} models" in bad
    refused = signed_in.get("/api/models", {"sort": "random"})
    assert refused.status_code == 400 and refused.json()["error"]["details"]["field"] == "sort"
    assert signed_in.get("/api/models", {"search": "a\x00b"}).status_code == 400


def test_typing_a_fragment_finds_the_model_and_a_reload_keeps_the_filters_at_phone_and_desktop_widths(stack, browser, user):  # noqa: F811
    many_models(MANY)
    for width, height in ((390, 844), (1280, 900)):
        context = browser.new_context(viewport={"width": width, "height": height})
        page = context.new_page()
        sign_in(page, stack, user.username)
        assert f"{MANY:,} models" in page.inner_text("#model-count")
        page.fill("#model-search", "el-09876")  # a fragment of org-79/model-09876
        page.wait_for_function("document.querySelectorAll('[id^=model-card-]').length === 1", timeout=10_000)
        assert page.inner_text("[id^=model-card-]").count("model-09876") >= 1
        assert "search=el-09876" in page.url and f"1 of {MANY:,} models match" in page.inner_text("#model-count")
        page.fill("#model-search", "")
        page.select_option("#model-architecture", "gemma2")
        page.select_option("#model-format", "Q2")
        page.wait_for_function("location.search.includes('format=Q2') && location.search.includes('architecture=gemma2')", timeout=10_000)
        page.wait_for_selector("#model-count:has-text('of')", timeout=10_000)
        expected = sum(1 for i in range(MANY) if FAMILIES[i % 5] == "gemma2" and FORMATS[(i // 5) % 5] == "Q2")
        assert f"{expected:,} of {MANY:,} models match" in page.inner_text("#model-count")
        page.reload()
        page.wait_for_selector("#connection-status[data-state=connected]", timeout=15_000)
        assert page.input_value("#model-architecture") == "gemma2" and page.input_value("#model-format") == "Q2"
        assert f"{expected:,} of {MANY:,} models match" in page.inner_text("#model-count")
        # The first frame of the page's socket is the filtered list too, not every model.
        page.wait_for_timeout(500)
        shown = [int(card.split("_")[-1], 16) for card in page.eval_on_selector_all("[id^=model-card-]", "cards => cards.map(c => c.id)")]
        assert len(shown) == min(expected, Model.PANEL_SIZE)
        assert all(FAMILIES[i % 5] == "gemma2" and FORMATS[(i // 5) % 5] == "Q2" for i in shown), shown
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        context.close()


def test_the_datasets_page_and_api_search_filter_sort_and_count_and_a_card_action_keeps_the_filters(signed_in):
    """The same for Datasets (issue 19, item 1): 300 datasets, a page of 20 at a time."""
    from activations_app.models import Dataset

    sources = ("upload", "local", "hub")
    Dataset.objects.bulk_create([Dataset(id=f"ds_{i:012x}", name=f"corpus-{i:03d}", source=sources[i % 3], text_column="text",
                                         status="ready" if i % 4 else "error", row_count=i * 10,
                                         repo_id=f"acme/set-{i:03d}" if i % 3 == 2 else "")
                                 for i in range(300)])  # fmt: skip
    page = html.unescape(signed_in.get("/datasets/").content.decode())
    assert "300 datasets" in page and page.count('id="dataset-ds_') == Dataset.PANEL_SIZE and 'id="more-datasets"' in page
    found = html.unescape(signed_in.get("/datasets/", {"search": "set-137"}).content.decode())
    assert found.count('id="dataset-ds_') == 1 and "corpus-137" in found and "1 of 300 datasets match" in found
    query = {"source": "hub", "status": "error", "sort": "rows"}
    expected = sorted((i for i in range(300) if i % 3 == 2 and i % 4 == 0), reverse=True)
    combined = html.unescape(signed_in.get("/datasets/", query).content.decode())
    assert f"{len(expected)} of 300 datasets match" in combined
    shown = [int(part.split('"')[0], 16) for part in combined.split('id="dataset-ds_')[1:]]
    assert shown == expected[: Dataset.PANEL_SIZE]
    api = signed_in.get("/api/datasets", {**query, "limit": 100}).json()
    assert api["pagination"]["total"] == len(expected) and [int(d["id"][3:], 16) for d in api["data"]] == expected
    assert signed_in.get("/api/datasets", {"source": "ftp"}).status_code == 400
    # A card's action sends the filters along and comes back to them.
    target = Dataset.objects.get(pk=f"ds_{expected[0]:012x}")
    back = signed_in.post(f"/datasets/{target.id}/delete", query)
    assert back.status_code == 302 and "source=hub" in back["Location"] and "sort=rows" in back["Location"]
    assert not Dataset.objects.filter(pk=target.id).exists()


def test_the_extractions_page_and_api_search_filter_and_page_within_one_models_history(signed_in, tiny_model):
    """The same for Extractions (issue 19, item 1): search by id or what it was made from,
    status, one model's history, 20 at a time."""
    from activations_app.models import Extraction

    request = {"layers": [0], "hook_types": ["residual"], "batch_size": 8, "max_samples": 8, "seq_len": 16}
    Extraction.objects.bulk_create([
        Extraction(id=f"ext_{i:012x}", model=tiny_model if i % 2 else None, model_label="acme/tiny FP32" if i % 2 else "gone/model FP16",
                   dataset_label=f"corpus-{i % 5}", status="completed" if i % 3 else "failed", **request)
        for i in range(120)])  # fmt: skip
    page = html.unescape(signed_in.get("/extractions/").content.decode())
    assert "120 extractions" in page and page.count('id="extraction-card-') == Extraction.PANEL_SIZE and 'id="more-extractions"' in page
    found = html.unescape(signed_in.get("/extractions/", {"search": "gone/model"}).content.decode())
    assert "60 of 120 extractions match" in found
    history = {"model_id": tiny_model.id, "status": "failed", "search": "corpus-3"}
    expected = sorted((i for i in range(120) if i % 2 and i % 3 == 0 and i % 5 == 3), reverse=True)
    narrowed = html.unescape(signed_in.get("/extractions/", history).content.decode())
    assert f"{len(expected)} of 120 extractions match" in narrowed and 'name="model_id" value="' + tiny_model.id in narrowed
    shown = [int(part.split('"')[0], 16) for part in narrowed.split('id="extraction-card-ext_')[1:]]
    # The list is marked as narrowed beyond the model's own history: a new card of the model may not match.
    assert shown == expected and 'data-filtered="search=corpus-3&status=failed"' in narrowed
    api = signed_in.get("/api/extractions", {**history, "limit": 100}).json()
    assert [int(row["id"][4:], 16) for row in api["data"]] == expected
    assert signed_in.get("/api/extractions", {"status": "sleeping"}).status_code == 400
