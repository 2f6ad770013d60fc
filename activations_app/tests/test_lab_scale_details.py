"""Issue 19's smaller items, each as a user meets it. Orphans keep their identity (item 7): an extraction whose model and dataset were
deleted still says what it was made from (repo, revision, format; the dataset's name), and
the dataset's delete confirm names the extractions that stay, as the model's does."""

from __future__ import annotations

import html

import pytest

from activations_app import jobs, services
from activations_app.models import Extraction
from models_app import services as model_services

pytestmark = pytest.mark.django_db(transaction=True)


def test_an_extraction_of_deleted_inputs_still_names_them_and_the_dataset_confirm_names_its_extractions(tiny_model, data_dir, signed_in):
    (data_dir / "imports" / "notes.txt").write_text("\n".join(f"Note {i} about the weather." for i in range(30)))
    dataset = services.import_dataset(path=str(data_dir / "imports" / "notes.txt"), name="weather notes")
    extraction = services.request_extraction(model_id=tiny_model.id, dataset_id=dataset.id, enqueue=False, layers=[0],
                                             hook_types=["residual"], max_samples=4, batch_size=4, seq_len=8)  # fmt: skip
    jobs.run_extraction_job(extraction.id)
    confirm = html.unescape(signed_in.get("/datasets/").content.decode())
    assert f"Delete weather notes and its files? Its 1 extraction stays: {extraction.id}." in confirm
    expected = f"{tiny_model.repo_id or tiny_model.name}{'@' + tiny_model.revision[:7] if tiny_model.revision else ''} FP32"
    model_services.delete_model(tiny_model.id, None)
    services.delete_dataset(dataset.id, None)
    row = Extraction.objects.get(pk=extraction.id)
    assert row.model_id is None and row.dataset_id is None and row.status == "completed"
    for page in (f"/extractions/{row.id}", "/extractions/"):
        text = html.unescape(signed_in.get(page).content.decode())
        assert f"{expected} (model deleted)" in text and "weather notes (dataset deleted)" in text, page


def test_the_admins_delete_with_files_asks_first_naming_each_record_and_only_yes_deletes(data_dir, client, django_user_model):
    staff = django_user_model.objects.create_superuser("staff", password="pw-for-admin-tests")
    client.force_login(staff)
    (data_dir / "imports" / "a.txt").write_text("one\ntwo\n")
    dataset = services.import_dataset(path=str(data_dir / "imports" / "a.txt"), name="to be deleted")
    folder = dataset.folder
    assert folder.exists()
    asked = client.post("/admin/activations_app/dataset/", {"action": "delete_selected_with_files", "_selected_action": [dataset.id]})
    page = html.unescape(asked.content.decode())
    assert asked.status_code == 200 and "Delete these records and their files?" in page and dataset.id in page
    assert 'name="post" value="yes"' in page and "No, take me back" in page
    from activations_app.models import Dataset

    assert Dataset.objects.filter(pk=dataset.id).exists() and folder.exists()  # asking deleted nothing
    done = client.post("/admin/activations_app/dataset/", {"action": "delete_selected_with_files", "_selected_action": [dataset.id],
                                                            "post": "yes"})  # fmt: skip
    assert done.status_code == 302 and not Dataset.objects.filter(pk=dataset.id).exists() and not folder.exists()


def test_the_admin_reads_as_the_app_does_headings_progress_and_messages(tiny_model, client, django_user_model):
    from mistudio.templatetags.ui import params
    from models_app.models import Model

    staff = django_user_model.objects.create_superuser("staff", password="pw-for-admin-tests")
    client.force_login(staff)
    index = client.get("/admin/").content.decode()
    assert ">Activations<" in index and ">Models<" in index and "Activations_App" not in index and "Models_App" not in index
    Model.objects.filter(pk=tiny_model.pk).update(status="downloading", progress=53.333333333333336)
    listing = client.get("/admin/models_app/model/").content.decode()
    assert "53.3%" in listing and "53.333333333333336" not in listing
    assert f">{params(tiny_model.params_count)}<" in listing and f">{tiny_model.params_count}<" not in listing
    # A refusal names the record as well as its id.
    refused = client.post("/admin/models_app/model/", {"action": "retry_selected", "_selected_action": [tiny_model.id]}, follow=True)
    assert f"{Model.objects.get(pk=tiny_model.pk)} ({tiny_model.id}):" in html.unescape(refused.content.decode())


def test_the_extraction_page_says_how_it_was_made_in_the_hook_colours_and_names_the_model(tiny_model, data_dir, signed_in):
    """Issue 19, item 9: the settings on the page, the charts in the contract's hook colours
    (purple residual, emerald MLP, sky attention) with labels outside the plot, histograms
    on a log count scale, and the filtered list titled by the model's name."""
    import re

    (data_dir / "imports" / "t.txt").write_text("\n".join(f"Line {i} of a short text about rivers." for i in range(40)))
    dataset = services.import_dataset(path=str(data_dir / "imports" / "t.txt"))
    extraction = services.request_extraction(model_id=tiny_model.id, dataset_id=dataset.id, enqueue=False, layers=[0, 1],
                                             hook_types=["residual", "mlp", "attention"], max_samples=6, batch_size=3, seq_len=12,
                                             tokenization="truncate", prepend_bos="never")  # fmt: skip
    jobs.run_extraction_job(extraction.id)
    page = html.unescape(signed_in.get(f"/extractions/{extraction.id}").content.decode())
    made = page.split('aria-label="How it was made"')[1].split("</dl>")[0]
    for label, value in (("Batch size", "3"), ("Sequence length", "12"), ("Max samples", "6"), ("Tokenization", "truncate"),
                         ("BOS first", "never"), ("Storage dtype", "float16")):  # fmt: skip
        assert re.search(rf"{label}</dt><dd[^>]*>{value}", made), label
    charts = {hook: page.split(f'data-hook="{hook}"')[1].split("</figure>")[0] for hook in ("residual", "mlp", "attention")}
    for hook, colour in (("residual", "#c084fc"), ("mlp", "#34d399"), ("attention", "#38bdf8")):
        assert f'stroke="{colour}"' in charts[hook] and all(c not in charts[hook] for c in {"#c084fc", "#34d399", "#38bdf8"} - {colour})
        assert 'class="panel-label"' in charts[hook] and 'dy="-5"' in charts[hook]  # above its panel, not on the line
    assert "counts on a log scale" in page
    listing = html.unescape(signed_in.get("/extractions/", {"model_id": tiny_model.id}).content.decode())
    assert f'of <span class="extractions-of">{tiny_model.name} FP32</span>' in listing


def test_small_things_a_researcher_notices(tiny_model, data_dir, client, signed_in, user, redis_clean):
    """Issue 19, item 12, in part: a failed sign-in keeps the username, every page has a skip
    link to its content, the tokenization tab shows each token as text (not Ġ/Ċ), and a
    duplicate download links to the model that is already here."""
    import re

    from models_app.models import Model

    failed = html.unescape(client.post("/login/", {"username": user.username, "password": "wrong"}).content.decode())
    assert re.search(rf'<input id="id_username"[^>]*value="{user.username}"', failed)
    assert re.search(r'<input id="id_password"[^>]*autofocus', failed)
    page = signed_in.get("/").content.decode()
    assert '<a href="#main" class="skip-link' in page and '<main id="main"' in page

    (data_dir / "imports" / "spaces.txt").write_text("Hello world, again\nSecond line here\n")
    dataset = services.import_dataset(path=str(data_dir / "imports" / "spaces.txt"))
    tokens = html.unescape(signed_in.get(f"/datasets/{dataset.id}/tokens", {"model_id": tiny_model.id}).content.decode())
    pieces = re.findall(r'<span class="px-1\.5[^>]*>([^<]*)</span>', tokens)
    assert pieces[:3] == ["Hello", "·world", ","] and not any("Ġ" in piece or "Ċ" in piece for piece in pieces), pieces

    Model.objects.create(name="SmolLM2-135M", repo_id="HuggingFaceTB/SmolLM2-135M", requested_quantization="FP32", status="ready")
    asked = html.unescape(signed_in.post("/models/download", {"repo_id": "HuggingFaceTB/SmolLM2-135M", "quantization": "FP32"},
                                         HTTP_HX_REQUEST="true").content.decode())  # fmt: skip
    existing = Model.objects.get(repo_id="HuggingFaceTB/SmolLM2-135M")
    assert f'href="/?search=HuggingFaceTB/SmolLM2-135M#model-card-{existing.id}"' in asked.replace("%2F", "/")


def test_hub_imports_are_named_by_subset_split_and_streaming_and_a_refused_import_keeps_the_form(signed_in, hub, tmp_path, data_dir):
    """Issue 19, item 13, in part: two subsets' same split, and a streamed import beside a
    whole copy, no longer share one default name; the form has Revision and Name fields, and
    a refused import gives the form back as it was sent (the token aside)."""
    import json

    from models_app.tests.hub_server import HubRepo, make_sha

    repo = tmp_path / "multi"
    for subset in ("code", "docs"):
        (repo / subset).mkdir(parents=True)
        for split in ("train", "test"):
            rows = "".join(json.dumps({"text": f"{subset} {split} row {i}"}) + "\n" for i in range(20))
            (repo / subset / f"{split}-00000-of-00001.jsonl").write_text(rows)
    hub.add_repo(HubRepo("acme/multi", repo, make_sha("acme/multi"), repo_type="dataset"))
    names = [services.request_hub_dataset(repo_id="acme/multi", name=None, text_column="text", split="test", token=None,
                                          config=config, enqueue=False, download_whole=whole).name
             for config, whole in (("code", False), ("docs", False), ("code", True))]  # fmt: skip
    assert names == ["acme/multi:code/test (streamed)", "acme/multi:docs/test (streamed)", "acme/multi:code/test"]

    sent = {"repo_id": "acme/multi", "split": "test", "text_column": "body", "config": "code", "revision": "main", "name": "mine",
            "download_whole": "1"}  # fmt: skip
    with_token = html.unescape(signed_in.post("/datasets/import", {**sent, "access_token": "hf_secret_never_echoed"}).content.decode())
    assert "rejected the access token" in with_token and "hf_secret_never_echoed" not in with_token
    refused = signed_in.post("/datasets/import", sent)
    page = html.unescape(refused.content.decode())
    assert refused.status_code in (400, 422) and "has no 'body' field (its fields: 'text')" in page  # the real fields, named
    for field, value in (("id_hub_repo", "acme/multi"), ("id_hub_split", "test"), ("id_hub_column", "body"), ("id_hub_config", "code"),
                         ("id_hub_revision", "main"), ("id_hub_name", "mine")):  # fmt: skip
        assert f'id="{field}"' in page and f'value="{value}"' in page.split(f'id="{field}"')[1].split(">")[0], field
    assert 'name="download_whole" value="1" class="accent-emerald-500" checked' in page


def test_queued_extraction_cards_say_their_place_in_line(tiny_model, data_dir, signed_in, redis_clean):
    """Issue 19, item 5: as the model cards do (no worker runs here, so both wait)."""
    import re

    (data_dir / "imports" / "q.txt").write_text("\n".join(f"Queued line {i}." for i in range(20)))
    dataset = services.import_dataset(path=str(data_dir / "imports" / "q.txt"))
    made = [services.request_extraction(model_id=tiny_model.id, dataset_id=dataset.id, layers=[layer], hook_types=["residual"],
                                        max_samples=4, batch_size=4, seq_len=8) for layer in (0, 1)]  # fmt: skip
    page = html.unescape(signed_in.get("/extractions/").content.decode())
    for extraction, place in zip(made, ("1st", "2nd"), strict=True):
        card = page.split(f'id="extraction-card-{extraction.id}"')[1].split('id="extraction-card-')[0]
        assert re.search(rf'waiting-note">· {place} in line for (any worker|the \w+ workers)<', card), card[:1500]


def test_a_wrong_columns_retry_lets_the_column_be_changed(signed_in, hub, tmp_path, data_dir):
    """Issue 19, item 13: an import that failed on its text column retries with another one,
    from the card's own field (the API takes `text_column` too); a blank one is refused."""
    import json

    from activations_app import jobs
    from activations_app.models import Dataset
    from models_app.tests.hub_server import HubRepo, make_sha

    repo = tmp_path / "bodies"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "train.jsonl").write_text("".join(json.dumps({"body": f"row {i} of the corpus"}) + "\n" for i in range(30)))
    hub.add_repo(HubRepo("acme/bodies", repo, make_sha("acme/bodies"), repo_type="dataset"))
    dataset = services.request_hub_dataset(repo_id="acme/bodies", name=None, text_column="body", split="train", token=None,
                                           enqueue=False, download_whole=True)  # fmt: skip
    # As a job that read a column the files do not hold ends (the request-time check reads only the first rows).
    Dataset.objects.filter(pk=dataset.pk).update(status="error", error_code="text_column", text_column="text",
                                                 error_message="data/train.jsonl line 1 has no 'text' field (its fields: 'body').")  # fmt: skip
    card = html.unescape(signed_in.get("/datasets/").content.decode()).split(f'id="dataset-{dataset.id}"')[1]
    assert 'name="text_column"' in card and 'value="text"' in card.split('name="text_column"')[1].split(">")[0]
    assert "Retry with this column" in card

    blank = signed_in.post(f"/api/datasets/{dataset.id}/retry", {"text_column": " "}, content_type="application/json")
    assert blank.status_code == 400 and Dataset.objects.get(pk=dataset.pk).status == "error"
    retried = signed_in.post(f"/datasets/{dataset.id}/retry", {"text_column": "body"})
    assert retried.status_code == 302  # back to the page, the card queued
    dataset.refresh_from_db()
    assert (dataset.status, dataset.text_column) == ("queued", "body")
    jobs.run_dataset_import(dataset.id)
    dataset.refresh_from_db()
    assert dataset.status == "ready" and dataset.row_count == 30 and dataset.preview[0] == "row 0 of the corpus"


def test_the_time_estimate_comes_from_a_run_measured_here_scaled_by_tokens_and_parameters(tiny_model, data_dir):
    """Issue 19, item 13: the Extract dialog said 2 m 18 s for a run of 33 s, from a rough
    FLOP figure. A run that finished here is measured (samples/s); the estimate uses it,
    scaled by tokens for another length and by parameters for another model, and says so."""
    from activations_app.ml.extract import ExtractionSpec
    from models_app.models import Model

    (data_dir / "imports" / "speed.txt").write_text("\n".join(f"Speed line {i} of the corpus." for i in range(200)))
    dataset = services.import_dataset(path=str(data_dir / "imports" / "speed.txt"))
    rough = services.estimate_extraction(tiny_model, ExtractionSpec(layers=[0], hook_types=["residual"], max_samples=100, seq_len=16),
                                         dataset)  # fmt: skip
    assert rough["time_basis"].startswith("rough:")
    run = services.request_extraction(model_id=tiny_model.id, dataset_id=dataset.id, layers=[0], hook_types=["residual"],
                                      max_samples=64, seq_len=16, batch_size=16, tokenization="packed", enqueue=False)  # fmt: skip
    jobs.run_extraction_job(run.id)
    run.refresh_from_db()
    assert run.status == "completed" and run.samples_per_second > 0
    speed = run.samples_per_second

    # Layer 1: not on disk yet, so the forward pass is estimated, not reused.
    same = services.estimate_extraction(tiny_model, ExtractionSpec(layers=[1], hook_types=["residual"], max_samples=64, seq_len=16,
                                                                   tokenization="packed"), dataset)  # fmt: skip
    assert same["time_seconds"] == pytest.approx(same["samples"] / speed)
    assert same["time_basis"] == f"measured {speed:.1f} samples/s at 16 tokens on this model"
    longer = services.estimate_extraction(tiny_model, ExtractionSpec(layers=[1], hook_types=["residual"], max_samples=64, seq_len=32,
                                                                     tokenization="packed"), dataset)  # fmt: skip
    assert longer["time_seconds"] == pytest.approx(longer["samples"] * 2 / speed) and "scaled by tokens" in longer["time_basis"]
    bigger = Model.objects.create(name="twice", status="ready", architecture=tiny_model.architecture, quantization="FP32",
                                  architecture_config=tiny_model.architecture_config, params_count=2 * tiny_model.params_count)  # fmt: skip
    other = services.estimate_extraction(bigger, ExtractionSpec(layers=[1], hook_types=["residual"], max_samples=64, seq_len=16,
                                                                tokenization="packed"), dataset)  # fmt: skip
    assert other["time_seconds"] == pytest.approx(other["samples"] * 2 / speed)
    assert "on SmolLM2-tiny FP32 scaled by parameters × tokens" in other["time_basis"]
