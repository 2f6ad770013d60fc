"""Every page and open modal in headless Chromium, as a new user drives them: no sideways
scroll at phone, tablet and desktop widths with 1,000 models in the list, no serious or
critical axe-core violation, no console error and no failed request (favicon included).
On a failure the page's screenshot goes into the test output folder."""

from pathlib import Path

import pytest
from django.utils import timezone

from activations_app import jobs as extraction_jobs
from activations_app import services as extraction_services
from activations_app.services import import_dataset
from models_app.models import Model, ModelStatus
from models_app.tests.test_browser import browser, sign_in, stack  # noqa: F401 - fixtures

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser]

AXE = Path(__file__).parent / "vendor" / "axe.min.js"
WIDTHS = (360, 390, 768, 1440)


@pytest.fixture
def records(smollm2_model, data_dir, user):
    """A lab's instance: 1,000 models, a real ready model with a finished extraction, a
    failed one, a dataset."""
    config = smollm2_model.architecture_config
    Model.objects.bulk_create(
        [Model(name=f"model-{i}", repo_id=f"org/model-{i}", status=ModelStatus.READY, architecture="llama",
               params_count=134_515_008, architecture_config=config, quantization="Q4", owner=user) for i in range(1000)]
    )  # fmt: skip
    Model.objects.create(name="broken", repo_id="org/broken", status=ModelStatus.ERROR, error_message="The Hub said 404.")
    Model.objects.filter(pk=smollm2_model.pk).update(created_at=timezone.now())  # first in the list
    (data_dir / "imports" / "river.txt").write_text("\n".join(f"Line {i} about the river and the city." for i in range(40)))
    dataset = import_dataset(path=str(data_dir / "imports" / "river.txt"))
    extraction = extraction_services.request_extraction(model_id=smollm2_model.id, dataset_id=dataset.id, enqueue=False,
                                                        layers=[0, 5, 29], hook_types=["residual", "mlp", "attention"],
                                                        max_samples=8, batch_size=4, seq_len=16)  # fmt: skip
    extraction_jobs.run_extraction_job(extraction.id)
    return {"model": smollm2_model, "dataset": dataset, "extraction": extraction}


def axe_violations(page) -> list[str]:
    page.add_script_tag(path=str(AXE))
    found = page.evaluate(
        """async () => {
          const result = await axe.run(document, {resultTypes: ['violations']});
          return result.violations.filter(v => v.impact === 'serious' || v.impact === 'critical')
            .map(v => v.id + ': ' + v.help + ' -- ' + v.nodes.slice(0, 3).map(n => n.target.join(' ')).join(' | '));
        }"""
    )
    return found


def fits(page, width: int) -> int:
    return page.evaluate("document.documentElement.scrollWidth")


def settle(page) -> None:
    page.wait_for_load_state("load")
    if page.locator("[ws-connect]").count():
        page.wait_for_selector("#connection-status[data-state=connected]", timeout=15_000)


def check(page, name: str, width: int, problems: list[str], run_axe: bool, tmp_path) -> None:
    before = len(problems)
    scroll = fits(page, width)
    if scroll > width:
        problems.append(f"{name} at {width}px scrolls sideways: {scroll}px wide")
    if run_axe:
        problems += [f"{name}: {v}" for v in axe_violations(page)]
    if len(problems) > before:
        page.screenshot(path=str(tmp_path / f"{name.replace('/', '_')}-{width}.png"), full_page=True)


def test_every_page_and_modal_fits_every_width_passes_axe_and_logs_no_error(stack, browser, user, records, tmp_path):  # noqa: F811
    model, extraction = records["model"], records["extraction"]
    problems: list[str] = []
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()  # the browser fixture fails the test on any console error, 404 or 5xx it logs
    sign_in(page, stack, user.username)
    pages = {"models": "/", "datasets": "/datasets/", "extractions": "/extractions/", "extraction": f"/extractions/{extraction.id}"}
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        for name, path in pages.items():
            page.goto(f"{stack}{path}")
            settle(page)
            check(page, name, width, problems, width in (390, 1440), tmp_path)
        page.goto(f"{stack}/")
        settle(page)
        for name, opener, modal in (("architecture modal", f"#model-card-{model.id} .model-open", "#architecture-modal"),
                                    ("extract dialog", f"#model-card-{model.id} .extract-open", "#extract-modal")):  # fmt: skip
            page.click(opener)
            page.wait_for_selector(modal, timeout=10_000)
            page.wait_for_timeout(300)
            check(page, name, width, problems, width in (390, 1440), tmp_path)
            page.keyboard.press("Escape")
            page.wait_for_selector(modal, state="detached", timeout=5_000)
        page.goto(f"{stack}/datasets/")
        settle(page)
        page.click(f"#dataset-{records['dataset'].id} .dataset-open")
        page.wait_for_selector("#dataset-modal", timeout=10_000)
        check(page, "dataset modal", width, problems, width in (390, 1440), tmp_path)
        if width == 1440:  # its tabs, by keyboard: the Tokenization tab reads with a ready model's tokenizer
            page.focus("#tab-overview")
            page.keyboard.press("ArrowRight")
            assert page.is_visible("#panel-samples") and not page.is_visible("#panel-overview")
            page.keyboard.press("ArrowRight")
            page.select_option("#tokenizer-model", model.id)
            page.wait_for_selector("#dataset-tokens .token-pieces span", timeout=15_000)
            assert page.locator(".dataset-token-counts tbody tr").count() == len(records["dataset"].preview)
            check(page, "dataset modal, tokenization", width, problems, True, tmp_path)
        page.keyboard.press("Escape")
        page.wait_for_selector("#dataset-modal", state="detached", timeout=5_000)
    browser.allow("/extractions/ext_0000")  # a 404 is the point of this visit: the error page fits and passes too
    page.goto(f"{stack}/extractions/ext_0000")
    for width in (360, 1440):
        page.set_viewport_size({"width": width, "height": 900})
        check(page, "error page", width, problems, True, tmp_path)
    signed_out = browser.new_context(viewport={"width": 360, "height": 800}).new_page()
    for width in (360, 1440):
        signed_out.set_viewport_size({"width": width, "height": 900})
        signed_out.goto(f"{stack}/login/")
        check(signed_out, "login", width, problems, True, tmp_path)
    assert not problems, "\n".join(problems) + f"\n(screenshots in {tmp_path})"
