"""The Models panel in headless Chromium, against daphne and an RQ worker (subprocesses),
the loopback Hub and the test database: what a researcher sees, without reloads."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import GATED_TOKEN
from models_app.models import Model
from models_app.tests.support import free_port, start_daphne, start_worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser]

PASSWORD = "correct horse battery"


def chromium_path() -> str:
    path = os.environ.get("MISTUDIO_CHROMIUM") or shutil.which("chromium")
    assert path, "Debian's chromium is required for the browser tests (scripts/test installs it)"
    return path


@pytest.fixture(scope="module")
def stack(hub_server, stack_data_root, django_db_setup):
    """daphne + one RQ worker, as the run command starts them, shared by a module's browser
    tests (starting them costs 4-5 s of CPU each time): the shared data dir is emptied
    before each test (conftest's data_dir), the database flushed after it, and a job left
    queued by an earlier test finds no row and ends."""
    port = free_port()
    env = {"MISTUDIO_DATA_DIR": str(stack_data_root), "MISTUDIO_IMPORT_ROOTS": str((stack_data_root / "imports").resolve()),
           "HF_ENDPOINT": hub_server.endpoint}  # fmt: skip
    server = start_daphne(port, **env)
    worker = start_worker(burst=False, log_file=True, **env)
    yield f"http://127.0.0.1:{port}"
    for process in (worker, server):
        process.terminate()
    for process in (worker, server):
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        print(Path(process.log_path).read_text()[-5000:])  # shown by pytest when a test fails


SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-output" / "screenshots"


class WatchedBrowser:
    """The browser as tests use it, watching every page they open for what a user's console
    would show: uncaught exceptions, console errors, 404s (favicon included) and server
    errors. A refusal the server answers on purpose (400, 403, 409, 422 to a form or htmx
    request) is the product working; `allow(url_part)` excuses a visit meant to fail."""

    EXPECTED = re.compile(r"status of (400|403|409|422)\b")

    def __init__(self, browser) -> None:
        self._browser = browser
        self.problems: list[str] = []
        self.allowed: list[str] = []

    def __getattr__(self, name):
        return getattr(self._browser, name)

    def allow(self, url_part: str) -> None:
        self.allowed.append(url_part)

    def _excused(self, url: str) -> bool:
        return any(part in url for part in self.allowed)

    def _console(self, message) -> None:
        url = (message.location or {}).get("url", "")
        if message.type == "error" and not self.EXPECTED.search(message.text) and not self._excused(url):
            self.problems.append(f"console error: {message.text} ({url})")

    def _response(self, response) -> None:
        if (response.status == 404 or response.status >= 500) and not self._excused(response.url):
            self.problems.append(f"{response.status} {response.url}")

    def watch(self, page):
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.problems.append(f"uncaught: {error}"))
        page.on("response", self._response)
        return page

    def new_context(self, **options):
        context = self._browser.new_context(**options)
        context.on("page", self.watch)
        return context

    def new_page(self, **options):
        return self.watch(self._browser.new_page(**options))


@pytest.fixture
def browser(monkeypatch, request):
    """Debian's headless Chromium. When the test fails, every page it opened is saved as a
    full-page screenshot under test-output/screenshots/ (named after the test)."""
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop in this thread; the ORM calls the test makes
    # are still plain synchronous ones.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )  # fmt: skip
        watched = WatchedBrowser(browser)
        yield watched
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            pages = [page for context in browser.contexts for page in context.pages]
            for n, page in enumerate(pages):
                path = SCREENSHOTS / f"{request.node.name[:120]}-{n}.png"
                try:
                    page.screenshot(path=str(path), full_page=True, timeout=10_000)
                    print(f"screenshot of {page.url}: {path}")
                except Exception as exc:  # noqa: BLE001 - the failure itself is what matters
                    print(f"no screenshot of {page.url}: {exc}")
        browser.close()
        if report is not None and report.passed:
            assert not watched.problems, "the pages logged:\n" + "\n".join(watched.problems)


def sign_in(page, base_url, username):
    page.goto(f"{base_url}/")
    assert "/login/" in page.url
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base_url}/")
    page.wait_for_selector("#connection-status[data-state=connected]", timeout=15_000)


def test_a_download_shows_live_progress_and_turns_ready_without_a_reload(stack, browser, hub, user):
    hub.bytes_per_second = 250_000  # the tiny model's weights take ~5 s
    session = browser.new_context()
    page = session.new_page()
    sign_in(page, stack, user.username)
    assert page.inner_text("#connection-label") == "Connected"
    page.wait_for_timeout(6_000)  # outlive the Redis read timeout: the socket must stay up
    assert page.inner_text("#connection-label") == "Connected"
    other_tab = session.new_page()
    other_tab.goto(f"{stack}/")
    other_tab.wait_for_selector("#connection-status[data-state=connected]", timeout=15_000)

    page.evaluate("window.__noReload = true")
    assert page.is_disabled("#download-button")
    page.fill("#id_repo_id", "tiny/gated")
    page.select_option("#id_quantization", "FP32")
    page.fill("#id_access_token", GATED_TOKEN)
    page.click("#download-button")

    card = page.wait_for_selector("[id^=model-card-]", timeout=10_000)
    card_id = card.get_attribute("id")
    # The card may come by the socket before the form's own answer clears the fields.
    page.wait_for_function("document.querySelector('#id_repo_id').value === '' && "
                           "document.querySelector('#id_access_token').value === ''", timeout=10_000)  # fmt: skip
    # Focus stays in the form for the next repo id, not on <body>.
    page.wait_for_function("document.activeElement && document.activeElement.id === 'id_repo_id'", timeout=5_000)
    assert page.input_value("#id_quantization") == "FP32"

    seen = set()
    selector = f"#{card_id} .progress-percent"
    read_percent = "sel => { const el = document.querySelector(sel); return el ? el.innerText : null; }"
    for _ in range(200):
        if page.get_attribute(f"#{card_id}", "data-status") == "ready":
            break
        # one atomic read: the card may be swapped out between a query and a separate read
        text = page.evaluate(read_percent, selector)
        if text is not None:
            seen.add(text)
        page.wait_for_timeout(50)
    page.wait_for_selector(f"#{card_id}[data-status=ready]", timeout=30_000)
    assert len(seen) >= 2, f"progress text never changed: {seen}"
    assert page.evaluate("window.__noReload") is True
    meta = page.inner_text(f"#{card_id} .model-meta")
    assert "params" in meta and "FP32 quantization" in meta and "memory" in meta

    other_tab.wait_for_selector(f"#{card_id}[data-status=ready]", timeout=10_000)
    assert Model.objects.get(pk=card_id.removeprefix("model-card-")).status == "ready"

    # Another format of the same repo@revision: made from the snapshot already here, its row
    # joins that snapshot's card live, in both tabs, and the card's sizes say it is shared.
    first_id = card_id.removeprefix("model-card-")
    page.fill("#id_repo_id", "tiny/gated")
    page.select_option("#id_quantization", "FP16")
    page.fill("#id_access_token", GATED_TOKEN)
    page.click("#download-button")
    for tab in (page, other_tab):
        row = tab.wait_for_selector(f"#model-group-{first_id} [id^=model-card-]:not(#model-card-{first_id})[data-status=ready]",
                                    timeout=30_000)  # fmt: skip
        second_id = row.get_attribute("id").removeprefix("model-card-")
        assert tab.locator("#model-list > .model-group").count() == 1  # no card of its own left behind
        assert "2 formats" in tab.inner_text(f"#model-group-{first_id}-head")
        assert "counted once" in tab.inner_text(f"#model-group-{first_id}-head")
    assert Model.objects.get(pk=second_id).snapshot_of == first_id
    assert GATED_TOKEN not in page.content() and GATED_TOKEN not in other_tab.content()


def test_a_bad_repo_id_shows_its_error_under_the_field(stack, browser, user):
    page = browser.new_page()
    sign_in(page, stack, user.username)
    page.fill("#id_repo_id", "https://huggingface.co/a/b")
    page.click("#download-button")
    error = page.wait_for_selector("#repo-error", timeout=10_000)
    assert "not a URL" in error.inner_text()
    assert Model.objects.count() == 0


def test_the_architecture_viewer_opens_expands_a_block_and_closes_with_escape(stack, browser, user, smollm2_folder):
    import json

    config = json.loads((smollm2_folder / "config.json").read_text())
    model = Model.objects.create(name="SmolLM2-135M", status="ready", architecture="llama", architecture_config=config,
                                 params_count=134_515_008, quantization="FP32")  # fmt: skip
    page = browser.new_context().new_page()
    sign_in(page, stack, user.username)
    page.click(f"#model-card-{model.id} .model-open")
    modal = page.wait_for_selector("#architecture-modal", timeout=10_000)
    assert "SmolLM2-135M Architecture" in modal.inner_text()
    assert page.inner_text(".tile-layers") == "30" and page.inner_text(".tile-hidden") == "576"
    block = "details[data-block='5']"
    assert not page.is_visible(f"{block} .submodule")
    page.click(f"{block} summary")
    page.wait_for_selector(f"{block} .submodule", state="visible")
    assert "model.layers.5.self_attn" in page.inner_text(f"{block}")
    page.keyboard.press("Escape")
    page.wait_for_selector("#architecture-modal", state="detached", timeout=5_000)
    page.click(f"#model-card-{model.id} .model-open")
    page.wait_for_selector("#architecture-modal")
    page.click("#architecture-modal .modal-close")
    page.wait_for_selector("#architecture-modal", state="detached", timeout=5_000)

    # Issue 19, item 8: at 390 px the diagram keeps its text readable (it scrolls sideways
    # inside its own box instead of shrinking to ~4 px), and the page itself does not.
    page.set_viewport_size({"width": 390, "height": 800})
    page.click(f"#model-card-{model.id} .model-open")
    page.wait_for_selector("#architecture-modal .block-diagram svg")
    smallest = page.eval_on_selector_all("#architecture-modal .block-diagram svg text",
                                         "els => Math.min(...els.map(e => e.getBoundingClientRect().height))")  # fmt: skip
    assert smallest >= 9, smallest
    assert page.evaluate("document.documentElement.scrollWidth") <= 390


def test_the_extraction_dialog_estimates_starts_and_the_card_reaches_completed(stack, browser, user, smollm2_model, data_dir):
    from activations_app.ml.extract import storage_bytes
    from activations_app.services import import_dataset
    from mistudio.templatetags.ui import bytes_short

    model = smollm2_model
    (data_dir / "imports" / "river.txt").write_text("\n".join(f"Line {i} about the river and the city." for i in range(50)))
    dataset = import_dataset(path=str(data_dir / "imports" / "river.txt"))

    context = browser.new_context()
    page = context.new_page()
    sign_in(page, stack, user.username)
    listing = context.new_page()  # a second tab on the Extractions list, never reloaded
    listing.goto(f"{stack}/extractions/")
    listing.wait_for_selector("#connection-status[data-state=connected]", timeout=15_000)
    assert listing.is_visible("#no-extractions")
    page.click(f"#model-card-{model.id} .extract-open")
    page.wait_for_selector("#extract-modal")
    assert page.locator(".layer-toggle").count() == 30
    assert page.is_disabled("#start-extraction")
    page.select_option("#id_dataset", dataset.id)
    page.click(".layer-toggle:has-text('L0') >> nth=0")
    page.click(".layer-toggle:has-text('L29')")
    page.check("input[name=hook_types][value=mlp]")
    page.fill("#id_max_samples", "4")
    page.fill("#id_batch_size", "2")
    page.fill("#id_seq_len", "16")
    expected = bytes_short(storage_bytes(4, 16, 576, "float16", 4))
    page.wait_for_function(f"document.querySelector('.estimate-storage') && document.querySelector('.estimate-storage').textContent === '{expected}'", timeout=15_000)
    assert page.is_enabled("#start-extraction")
    page.evaluate("window.__noReload = true")
    page.click("#start-extraction")
    page.wait_for_url("**/extractions/ext_*", timeout=15_000)
    page.evaluate("window.__noReload = true")  # the detail page, from here on without a reload
    # The list tab shows the new run without a reload, the empty state gone.
    listing.wait_for_selector("[id^=extraction-card-]", timeout=15_000)
    assert not listing.is_visible("#no-extractions")
    # The detail page finishes live: badge, statistics, charts; Cancel gone.
    page.wait_for_selector("[id^=extraction-detail-][data-status=completed] .statistics-table", timeout=120_000)
    assert page.evaluate("window.__noReload") is True
    assert page.locator(".cancel-button").count() == 0
    rows = page.locator(".statistics-table tbody tr")
    assert rows.count() == 4
    assert "layer_29_mlp.npy" in page.inner_text(".statistics-table")
    assert page.locator(".layer-charts figure").count() == 2  # residual and mlp, across L0 and L29
    assert page.locator(".norm-histograms figure svg rect").count() > 0
    listing.wait_for_selector("[id^=extraction-card-][data-status=completed]", timeout=15_000)
    # (no htmx:oobErrorNoTarget or other console error in either tab: the browser fixture checks)


def test_the_datasets_page_after_an_upload_fits_the_window_and_a_reload_does_not_upload_again(stack, browser, user, tmp_path):
    from activations_app.models import Dataset

    page = browser.new_page(viewport={"width": 1440, "height": 900})
    sign_in(page, stack, user.username)
    page.goto(f"{stack}/datasets/")
    corpus = tmp_path / "long.txt"
    corpus.write_text("x" * 3000 + "\nsecond row\n")  # one 3,000-character word in the preview
    page.set_input_files("#id_file", str(corpus))
    page.click("form[action$='/datasets/upload'] button[type=submit]")
    page.wait_for_url(f"{stack}/datasets/")  # redirected after the POST
    page.wait_for_selector("[id^=dataset-]")
    assert page.evaluate("document.documentElement.scrollWidth") <= 1440
    page.reload()
    page.wait_for_selector("[id^=dataset-]")
    assert Dataset.objects.count() == 1  # F5 did not post the upload again
    assert page.title() == "Datasets · MechInterp Studio"


def test_the_architecture_viewer_by_keyboard_space_opens_focus_stays_inside_escape_gives_it_back(stack, browser, user, smollm2_folder):
    import json

    config = json.loads((smollm2_folder / "config.json").read_text())
    model = Model.objects.create(name="SmolLM2-135M", status="ready", architecture="llama", architecture_config=config,
                                 params_count=134_515_008, quantization="FP32")  # fmt: skip
    page = browser.new_page()
    sign_in(page, stack, user.username)
    opener = f"#model-card-{model.id} .model-open"
    page.focus(opener)
    scroll = page.evaluate("window.scrollY")
    page.keyboard.press(" ")
    page.wait_for_selector("#architecture-modal", timeout=10_000)
    assert page.evaluate("window.scrollY") == scroll  # Space opened it instead of scrolling
    inside = "() => document.getElementById('architecture-modal').contains(document.activeElement)"
    page.wait_for_function(inside, timeout=5_000)  # the dialog took focus
    for _ in range(40):  # Tab past the last control comes back to the first: focus never leaves
        page.keyboard.press("Tab")
        assert page.evaluate(inside)
    page.keyboard.press("Shift+Tab")
    assert page.evaluate(inside)
    page.keyboard.press("Escape")
    page.wait_for_selector("#architecture-modal", state="detached", timeout=5_000)
    assert page.evaluate(f"document.activeElement === document.querySelector({opener!r})")  # focus given back
    page.keyboard.press("Enter")
    page.wait_for_selector("#architecture-modal", timeout=10_000)


def test_the_gated_estimate_refreshes_when_the_token_is_pasted(stack, browser, user):
    page = browser.new_page()
    sign_in(page, stack, user.username)
    page.fill("#id_repo_id", "tiny/gated")
    page.wait_for_selector("#format-estimates .format-estimates", timeout=10_000)
    assert "gated" in page.inner_text("#format-estimates")
    assert page.is_disabled("#download-button")  # the refusal the estimate knows blocks Download
    assert page.input_value("#id_repo_id") == "tiny/gated"
    page.fill("#id_access_token", GATED_TOKEN)
    page.wait_for_selector("#format-estimates .estimate", timeout=10_000)  # the figures replace the refusal
    assert "gated" not in page.inner_text("#format-estimates")
    assert page.is_enabled("#download-button")
    assert GATED_TOKEN not in page.content()


def signed_in_extract_dialog(browser, stack, user, model, data_dir):
    """A 20-row dataset, and the model's Extract dialog open on it: the page and the dataset."""
    from activations_app.services import import_dataset

    (data_dir / "imports" / "river.txt").write_text("\n".join(f"Line {i} about the river." for i in range(20)))
    dataset = import_dataset(path=str(data_dir / "imports" / "river.txt"))
    page = browser.new_page()
    sign_in(page, stack, user.username)
    page.click(f"#model-card-{model.id} .extract-open")
    page.wait_for_selector("#extract-modal")
    page.select_option("#id_dataset", dataset.id)
    return page, dataset


def test_a_start_the_server_refuses_stays_in_the_dialog_until_the_request_changes(stack, browser, user, smollm2_model, data_dir):
    from activations_app.models import Dataset

    page, dataset = signed_in_extract_dialog(browser, stack, user, smollm2_model, data_dir)
    page.click(".layer-toggle:has-text('L3')")
    page.wait_for_selector(".estimate-storage", timeout=15_000)
    Dataset.objects.filter(pk=dataset.id).delete()  # gone between the estimate and Start
    page.fill("#id_seq_len", "32")  # its change fires as Start takes the focus: an estimate refresh follows
    page.click("#start-extraction")
    page.wait_for_selector("#start-status .start-refusal", timeout=10_000)
    page.wait_for_timeout(1_500)  # well past the estimate refresh
    assert page.is_visible("#start-status .start-refusal")
    assert "Not started" in page.inner_text("#start-status")
    page.fill("#id_seq_len", "64")  # the request changed: the refusal no longer applies to it
    page.wait_for_selector("#start-status .start-refusal", state="detached", timeout=5_000)


def test_the_extract_dialog_saves_a_template_and_loads_it_again(stack, browser, user, smollm2_model, data_dir):
    page, dataset = signed_in_extract_dialog(browser, stack, user, smollm2_model, data_dir)
    page.click(".layer-toggle:has-text('L7')")
    page.click(".layer-toggle:has-text('L12')")
    page.check("input[name=hook_types][value=attention]")
    page.fill("#id_seq_len", "96")
    page.fill("#id_template_name", "mid layers")
    page.click(".template-save")
    page.wait_for_selector(".template-notice:has-text('Saved')", timeout=10_000)
    page.click(".template-favourite")
    page.wait_for_selector(".template-notice:has-text('favourite')", timeout=10_000)
    page.keyboard.press("Escape")
    page.wait_for_selector("#extract-modal", state="detached")
    # A fresh dialog: load the template, and everything it saved is back (the dataset kept).
    page.click(f"#model-card-{smollm2_model.id} .extract-open")
    page.wait_for_selector("#extract-modal")
    page.select_option("#id_dataset", dataset.id)
    option = page.locator("#id_template option", has_text="mid layers")
    assert option.inner_text().startswith("★")
    page.select_option("#id_template", option.get_attribute("value"))
    page.wait_for_selector(".template-notice:has-text('Loaded')", timeout=10_000)
    checked = page.eval_on_selector_all("#extract-form [name=layers]:checked", "els => els.map(e => e.value)")
    hooks = page.eval_on_selector_all("#extract-form [name=hook_types]:checked", "els => els.map(e => e.value)")
    assert checked == ["7", "12"] and hooks == ["residual", "attention"]
    assert page.input_value("#id_seq_len") == "96" and page.input_value("#id_dataset") == dataset.id
    page.wait_for_selector(".estimate-storage", timeout=15_000)  # the estimate runs for the loaded request
    assert page.is_enabled("#start-extraction")


def test_the_extract_dialog_at_390px_keeps_estimates_by_start_focus_in_place_and_the_dataset_when_reopened(
    stack, browser, user, smollm2_model, data_dir
):
    """Issue 19, item 12: the estimates sit by Start (no scroll between them) at 390 px;
    loading a template with no dataset chosen says nothing red and leaves focus on the
    template chooser; a dialog closed and opened again still has the dataset chosen."""
    from activations_app.services import save_template

    from django.http import QueryDict

    data = QueryDict(mutable=True)
    data.setlist("layers", ["1", "2"])
    data.setlist("hook_types", ["residual"])
    save_template(model_id=smollm2_model.id, name="two layers", data=data, user=user)
    page, dataset = signed_in_extract_dialog(browser, stack, user, smollm2_model, data_dir)
    page.set_viewport_size({"width": 390, "height": 800})
    page.click(".layer-toggle:has-text('L3')")
    page.wait_for_selector(".estimate-storage", timeout=15_000)
    viewport = page.viewport_size["height"]
    for selector in (".estimate-time", ".estimate-storage", "#start-extraction"):
        box = page.locator(selector).bounding_box()
        assert box is not None and 0 <= box["y"] and box["y"] + box["height"] <= viewport, (selector, box)

    page.keyboard.press("Escape")
    page.wait_for_selector("#extract-modal", state="detached")
    page.click(f"#model-card-{smollm2_model.id} .extract-open")
    page.wait_for_selector("#extract-modal")
    assert page.input_value("#id_dataset") == dataset.id  # remembered for this session
    page.click(".layer-toggle:has-text('L3')")
    page.wait_for_selector(".estimate-storage", timeout=15_000)

    page.select_option("#id_dataset", "")
    page.focus("#id_template")
    option = page.locator("#id_template option", has_text="two layers")
    page.select_option("#id_template", option.get_attribute("value"))
    page.wait_for_selector(".template-notice:has-text('Loaded')", timeout=10_000)
    page.wait_for_timeout(800)  # the estimate the loaded dialog asks for has answered
    assert page.locator(".extract-refusal").count() == 0 and "Choose a dataset, layers and hooks" in page.inner_text("#extract-estimates")
    assert page.evaluate("document.activeElement.id") == "id_template"
    page.keyboard.press("Escape")
    page.wait_for_selector("#extract-modal", state="detached")
    assert page.evaluate("document.activeElement.classList.contains('extract-open')")  # focus back where it was
