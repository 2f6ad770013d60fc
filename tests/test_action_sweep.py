"""Every action in every state, clicked in Chromium, generated from the code: the row
states are every kind of state of every tracked row class (queued, running, failed,
cancelled, done, from its status constants; plus a stopped run that kept its
checkpoint), the pages are the URLconf's pages that render for those rows, and the
buttons are whatever those pages (and the dialogs their openers load) show. Each button
gets a fresh copy of the same records and a fresh page, and is clicked as a user would
(confirmations accepted, the form's choices made). What must hold: no 403, 404, 405 or
5xx answers an action; the page visibly changes; the POST carried the CSRF token (a 403
is how a missing one shows)."""

from __future__ import annotations

import numpy as np
import pytest
from django.apps import apps
from django.core import serializers
from django.test import Client

from mistudio.jobs import TrackedRow
from mistudio.staging import staged_path
from models_app.tests.support import free_port, start_daphne
from models_app.tests.test_browser import browser  # noqa: F401 - fixture
from tests.test_route_sweep import real_ids, route_table, value_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser]

APPS = ("models_app", "activations_app")
# Submit buttons of POST forms (plain or htmx), and other elements that POST on a click
# (htmx's default trigger for anything but a form or a field).
ACTIONS = ("form[method=post] button[type=submit], form[method=post] button:not([type]), "
           "form[hx-post] button:not([type=button]), "
           "[hx-post]:not(form, input, select, textarea):not([hx-trigger]), [hx-post][hx-trigger^=click]")  # fmt: skip
OPENERS = "[hx-get][hx-target='#modal']"


def tracked_classes() -> list[type]:
    found, pending = [], list(TrackedRow.__subclasses__())
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if not cls._meta.abstract:
            found.append(cls)
    return found


def statuses(cls) -> list[str]:
    """One status of each kind of state the row class defines: queued, running (the first of
    its running phases after queued), failed, cancelled, done."""
    running = next(status for status in cls.RUNNING if status != cls.QUEUED)
    return [cls.QUEUED, running, cls.FAILED, cls.CANCELLED, cls.DONE]


@pytest.fixture
def every_state(tiny_model, data_dir, user):
    """One row of each tracked kind in each kind of state, owned by the signed-in user;
    the ready model, the ready dataset and the completed extraction are real (an extraction
    of SmolLM2 ran); failed and cancelled extractions come twice, one with a checkpoint."""
    from activations_app import jobs as extraction_jobs
    from activations_app import services as extraction_services
    from activations_app.models import Dataset, Export, Extraction
    from models_app.models import Model

    Model.objects.filter(pk=tiny_model.pk).update(owner=user)
    (data_dir / "imports" / "lines.txt").write_text("\n".join(f"Line {i} of the sweep, about rivers." for i in range(40)))
    dataset = extraction_services.import_dataset(path=str(data_dir / "imports" / "lines.txt"), user=user)
    done = extraction_services.request_extraction(model_id=tiny_model.id, dataset_id=dataset.id, enqueue=False, user=user,
                                                  layers=[0], hook_types=["residual"], max_samples=8, batch_size=8, seq_len=8)  # fmt: skip
    extraction_jobs.run_extraction_job(done.id)
    export = extraction_services.export_extraction(done.id, user, enqueue=False)
    extraction_jobs.run_export_job(export.id)
    rows = {Model: Model.objects.get(pk=tiny_model.pk), Dataset: dataset, Extraction: Extraction.objects.get(pk=done.pk),
            Export: Export.objects.get(pk=export.pk)}  # fmt: skip
    made = []
    for cls in tracked_classes():
        template = rows[cls]
        for status in statuses(cls):
            if status == template.status:
                continue
            copy = cls.objects.get(pk=template.pk)
            copy.pk = cls._meta.pk.get_default()
            copy.status = status
            copy.error_code, copy.error_message = ("worker_died", "Its worker stopped.") if status == cls.FAILED else ("", "")
            copy.save()
            made.append(copy)
            if cls is Extraction and status in (cls.FAILED, cls.CANCELLED):
                kept = cls.objects.get(pk=copy.pk)
                kept.pk = cls._meta.pk.get_default()
                kept.save()
                staged = staged_path(kept.final_dir)
                staged.mkdir(parents=True)
                np.savez(staged / "checkpoint.npz", __rows__=np.int64(4), __fingerprint__=np.str_("x"))
                made.append(kept)
    return {"rows": made, "count": len(made) + 3}


class Records:
    """The records and files as the fixture made them, put back before every click."""

    def __init__(self, data_dir, tmp_path):
        import shutil

        self.data_dir, self.copy = data_dir, tmp_path / "pristine"
        shutil.copytree(data_dir, self.copy, symlinks=True)
        self.models = [m for m in apps.get_models() if m._meta.app_label in APPS]
        self.dump = serializers.serialize("json", [row for model in self.models for row in model.objects.all()])

    def restore(self, redis) -> None:
        import shutil

        for model in reversed(self.models):
            model.objects.all().delete()
        for obj in serializers.deserialize("json", self.dump):
            obj.save()
        shutil.rmtree(self.data_dir)
        shutil.copytree(self.copy, self.data_dir, symlinks=True)
        redis.flushdb()


def pages(base_url: str, client) -> list[str]:
    """The URLconf's GET routes (outside /api/ and the admin) that render a whole page for
    these records."""
    ids = real_ids()
    found = []
    for template, names in route_table():
        if template.startswith(("api/", "admin/", "static/")) or "(?P" in template:
            continue
        path = "/" + template
        for name in names:
            path = path.replace(f"<str:{name}>", value_for(name, ids))
        response = client.get(path)
        if response.status_code == 200 and b"<html" in response.content[:200].lower():
            found.append(path)
    # Every extraction has its own page: one per state.
    from activations_app.models import Extraction

    found += [f"/extractions/{pk}" for pk in Extraction.objects.values_list("pk", flat=True)]
    return sorted(set(found))


def session_cookie(user, base_url: str) -> dict:
    client = Client()
    client.force_login(user)
    return {"name": "sessionid", "value": client.cookies["sessionid"].value, "url": base_url}


class Quiet:
    """Waits until the page has had no request in flight for a moment (a plain POST's
    redirect and the page after it, an htmx swap): networkidle's 500 ms, at 120 ms."""

    def __init__(self, page):
        self.page, self.pending, self.answers, self.sent = page, set(), [], 0
        page.on("request", self._sent)
        page.on("requestfinished", self._done)
        page.on("requestfailed", self._done)
        page.on("response", lambda response: self.answers.append((response.status, response.request.method, response.url)))

    def _sent(self, request):
        self.pending.add(request)
        self.sent += 1

    def _done(self, request):
        self.pending.discard(request)

    def wait_for_a_request(self, since: int, limit_ms: int = 5_000) -> None:
        """After a click: until it has sent something (a confirmation and a busy machine
        can delay it past the quiet window), or `limit_ms` (a button that sends nothing)."""
        waited = 0
        while self.sent == since and waited < limit_ms:
            self.page.wait_for_timeout(25)
            waited += 25

    def wait(self, quiet_ms: int = 120, limit_ms: int = 10_000) -> None:
        waited = still = 0
        while waited < limit_ms:
            self.page.wait_for_timeout(50)
            waited += 50
            still = still + 50 if not self.pending else 0
            if still >= quiet_ms:
                return


def open_page(context, url: str, opener: int | None, reuse=None):
    """The page at `url` (in a new tab, or in `reuse`, a (page, quiet) pair), its dialog
    opened by the `opener`-th opener when given."""
    if reuse is None:
        page = context.new_page()
        page.on("dialog", lambda dialog: dialog.accept())
        quiet = Quiet(page)
    else:
        page, quiet = reuse
    # htmx (a deferred script) has set the page up by DOMContentLoaded; the socket and the
    # stylesheet need not be waited for to click.
    page.goto(url, wait_until="domcontentloaded")
    if opener is not None:
        page.locator(OPENERS).nth(opener).click()
        page.wait_for_selector("#modal > *", timeout=10_000)
        quiet.wait()
    return page, quiet


# What tells two buttons apart: the endpoint, the fields the form sends and the label. The
# same form on many pages (Sign out in the header) is clicked once.
IDENTITY = """b => {
  const form = b.form || b.closest('form');
  const fields = form ? [...form.querySelectorAll('input[type=hidden]:not([name=csrfmiddlewaretoken])')].map(i => i.name + '=' + i.value) : [];
  return [b.getAttribute('hx-post') || (form && (form.getAttribute('hx-post') || form.getAttribute('action'))) || '', fields.join('&'), b.innerText.trim()].join(' | ');
}"""


def choose_everything(button) -> bool:
    """What a user does before Start: in the button's form, pick the first option of each
    unset select and the first box of each group of checkboxes, so it is enabled. Whether
    anything was chosen."""
    return button.evaluate(
        """b => {
          const form = b.form || b.closest('form');
          if (!form) return false;
          let changed = false;
          form.querySelectorAll('select').forEach(s => {
            if (!s.value) { const o = [...s.options].find(o => o.value); if (o) { s.value = o.value; changed = true; s.dispatchEvent(new Event('change', {bubbles: true})); } }
          });
          const groups = {};
          form.querySelectorAll('input[type=checkbox]').forEach(x => { (groups[x.name] = groups[x.name] || []).push(x); });
          Object.values(groups).forEach(boxes => { if (!boxes.some(x => x.checked)) { boxes[0].checked = true; changed = true; boxes[0].dispatchEvent(new Event('change', {bubbles: true})); } });
          return changed;
        }"""
    )


@pytest.mark.parametrize("part", [0, 1])  # the pages in two halves, which two test workers sweep side by side
def test_every_button_in_every_state_works_and_carries_its_csrf_token(part, every_state, browser, user, data_dir, tmp_path, redis_clean):  # noqa: F811
    port = free_port()
    server = start_daphne(port)
    base = f"http://127.0.0.1:{port}"
    try:
        client = Client()
        client.force_login(user)
        everything = pages(base, client)
        urls = everything[part::2]
        records = Records(data_dir, tmp_path)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.add_cookies([session_cookie(user, base)])
        # The actions each page and each dialog shows, by their position on the page.
        targets, seen = [], set()

        def collect(url, opener, locator):
            for n, identity in enumerate(locator.evaluate_all(f"buttons => buttons.map({IDENTITY})")):
                if identity not in seen:
                    seen.add(identity)
                    targets.append((url, opener, n, identity))

        # One load of each page; its dialogs opened one after another on it (each opener's
        # answer replaces the dialog), clicked from script: an open dialog covers the rest.
        tab = open_page(context, base + "/", None)
        for url in urls:
            page, quiet = open_page(context, base + url, None, reuse=tab)
            collect(url, None, page.locator(ACTIONS))
            for opener in range(page.locator(OPENERS).count()):
                page.evaluate("() => { document.querySelector('#modal').innerHTML = ''; }")  # the last dialog's buttons go
                sent = quiet.sent
                page.locator(OPENERS).nth(opener).evaluate("el => el.click()")
                quiet.wait_for_a_request(sent)
                quiet.wait()
                page.wait_for_selector("#modal > *", timeout=30_000)  # both test workers busy: one CI run took over 10 s
                collect(url, opener, page.locator(f"#modal :is({ACTIONS})"))
        problems, clicked, disabled, refused_by_browser = [], 0, 0, 0
        # The same tab for every click, each on a fresh load.
        for url, opener, n, label in targets:
            tab[0].goto("about:blank")  # no page of the last click reconnects while its rows are put back
            records.restore(redis_clean)
            context.clear_cookies()
            context.add_cookies([session_cookie(user, base)])
            page, quiet = open_page(context, base + url, opener, reuse=tab)
            scope = "#modal " if opener is not None else ""
            button = page.locator(f"{scope}:is({ACTIONS})").nth(n)
            # A button in a tab not shown yet: its tab is clicked first, as a user would.
            tab_id = button.evaluate("b => { const p = b.closest('[role=tabpanel]'); return p && p.hidden ? p.getAttribute('aria-labelledby') : null; }") if button.count() else None
            if tab_id:
                page.click(f"#{tab_id}")
            if button.count() and choose_everything(button):
                quiet.wait()
            if not button.count() or button.is_disabled():
                disabled += 1
                continue
            # A form the browser itself refuses (a required field left empty) says so in place.
            browser_refuses = button.evaluate("b => !!b.form && !b.form.checkValidity()")
            html = button.evaluate("b => b.outerHTML.slice(0, 160)")
            quiet.answers.clear()
            before = (page.url, page.content())
            sent = quiet.sent
            button.click()
            if not browser_refuses:
                quiet.wait_for_a_request(sent)
            quiet.wait()
            where = f"{label.strip()[:40]!r} on {url}" + (f" (dialog {opener})" if opener is not None else "")
            where += f" [{html}]"
            bad = [f"{status} {method} {answer}" for status, method, answer in quiet.answers if status in (403, 404, 405) or status >= 500]
            if bad:
                problems.append(f"{where}: {', '.join(bad)}")
            elif (page.url, page.content()) == before and not browser_refuses:
                problems.append(f"{where}: nothing visible happened")
            refused_by_browser += browser_refuses
            clicked += 1
        print(f"\naction sweep: {len(tracked_classes())} row kinds in {every_state['count']} rows (every kind of state), "
              f"{len(urls)} of {len(everything)} pages and their dialogs, {len(targets)} actions: {clicked} clicked ({refused_by_browser} stopped by "
              f"the browser's own form check), {disabled} disabled")  # fmt: skip
        assert clicked >= 10, targets
        assert not problems, "\n".join(problems)
    finally:
        for context in browser.contexts:
            context.close()  # before the server goes: open pages would log their reconnects
        server.terminate()
        server.wait(timeout=10)
