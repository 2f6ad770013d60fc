"""The Models panel's HTML: the form, and each card state as a researcher reads it."""

import re

import pytest

from models_app.models import Model

pytestmark = pytest.mark.django_db


def make_model(**fields) -> Model:
    defaults = {"name": "SmolLM2-135M", "repo_id": "HuggingFaceTB/SmolLM2-135M", "status": "ready"}
    return Model.objects.create(**{**defaults, **fields})


def card_html(client, model) -> str:
    """The page as served (one model per test, so the card is the page's only one)."""
    html = client.get("/").content.decode()
    assert f'id="model-card-{model.id}"' in html
    return html


def test_a_ready_card_shows_params_format_and_memory_like_the_mock(signed_in):
    model = make_model(params_count=134_515_008, quantization="FP16", memory_required_bytes=322_836_019,
                       memory_measured_bytes=322_836_019)  # fmt: skip
    html = card_html(signed_in, model)
    assert "135M params • FP16 quantization • 323MB memory" in html
    assert "bg-emerald-900/30 text-emerald-400" in html and ">ready<" in html
    assert "Download Progress" not in html
    assert f'hx-post="/models/{model.id}/delete"' in html


def test_a_downloading_card_shows_bytes_speed_eta_and_a_bar_of_that_width(signed_in):
    model = make_model(
        status="downloading", progress=45.2, bytes_done=243_000_000, bytes_total=538_000_000, speed_bps=12_500_000, eta_seconds=23.6
    )
    html = card_html(signed_in, model)
    assert "Download Progress" in html and "45.2%" in html
    assert "width: 42.9%" in html and "42.9% overall" in html  # the download is 95 % of an FP32 job
    assert "243MB / 538MB" in html and "12.5 MB/s" in html and "ETA 24s" in html
    assert "animate-spin" in html and f'hx-post="/models/{model.id}/cancel"' in html
    assert "/delete" not in html


def test_the_bar_never_moves_back_from_download_to_loading_to_quantizing(signed_in):
    """Each phase's own progress starts again at 0; the bar shows the whole job's."""
    model = make_model(status="downloading", progress=0.0, requested_quantization="Q4", bytes_total=542_000_000, bytes_done=0)
    widths = []
    for status, progress in (("downloading", 0.0), ("downloading", 50.0), ("downloading", 100.0), ("loading", 100.0),
                             ("quantizing", 0.0), ("quantizing", 60.0), ("quantizing", 100.0)):  # fmt: skip
        # As the job writes them: the quantizing phase starts its byte counters at nothing (they count
        # a streamed quantization's bytes, tested in test_streamed_quantization).
        counters = {"bytes_done": 0, "bytes_total": 0} if status == "quantizing" else {"bytes_done": int(542_000_000 * progress / 100)}
        Model.objects.filter(pk=model.pk).update(status=status, progress=progress, **counters)
        html = card_html(signed_in, Model.objects.get(pk=model.pk))
        widths.append(float(html.split('class="progress-bar')[1].split("width: ")[1].split("%")[0]))
        if status == "quantizing":
            assert "Quantizing" in html and f"{progress:.1f}%" in html
            assert "transfer-stats" not in html  # no "542MB / 542MB 0.0 MB/s" beside the quantizing phase
    assert widths == sorted(widths) and widths[0] == 0.0 and widths[3] == 80.0 and widths[-1] == 100.0, widths


def test_an_error_card_says_what_to_do(signed_in):
    model = make_model(
        status="error", error_code="gated_token_required",
        error_message="meta-llama/Llama-3.2-1B is gated: add an access token from an account that has been granted access.",
    )  # fmt: skip
    html = card_html(signed_in, model)
    assert "is gated: add an access token" in html and "text-red-400" in html


def test_the_page_shows_the_download_form_with_format_choices(signed_in):
    html = signed_in.get("/").content.decode()
    for text in ("HuggingFace Model Repository", "Quantization Format", "Access Token",
                 "hf_xxxxxxxxxxxxxxxxxxxx", "Download Model from HuggingFace", 'ws-connect="/ws/models/"',
                 "FP32 (Full Precision)", "Q4 (4-bit)", "researcher", "CPU"):  # fmt: skip
        assert text in html, text
    assert "/static/vendor/htmx.min.js" in html and "/static/vendor/htmx-ext-ws.js" in html


def test_submitting_the_form_returns_a_cleared_form_and_the_list_with_the_new_card(signed_in, redis_clean):
    response = signed_in.post(
        "/models/download",
        {"repo_id": "HuggingFaceTB/SmolLM2-135M", "quantization": "FP32", "access_token": "hf_secret_value_123"},
        HTTP_HX_REQUEST="true",
    )
    html = response.content.decode()
    model = Model.objects.get()
    assert response.status_code == 200
    # The list comes along out-of-band, every model again (the filters are cleared with it).
    assert re.search(r'<section id="model-results"[^>]*hx-swap-oob="true"', html) and '<div id="model-list" class="grid gap-4">' in html
    assert re.search(r'<form id="model-filters"[^>]*hx-swap-oob="true"', html) and re.search(r'<input id="model-search"[^>]*value=""', html)
    assert f'id="model-card-{model.id}"' in html
    assert re.search(r'<input id="id_repo_id"[^>]* value=""', html)
    assert '<option value="FP32" selected>' in html
    assert "hf_secret_value_123" not in html


def test_the_admin_lists_models_with_filters_and_search(client, django_user_model):
    admin = django_user_model.objects.create_superuser("boss", "", "pw-for-admin-123")
    client.force_login(admin)
    make_model(architecture="llama")
    make_model(name="pythia", architecture="gpt_neox", status="error")
    page = client.get("/admin/models_app/model/?status__exact=error&q=pythia")
    html = page.content.decode()
    assert page.status_code == 200
    assert "pythia" in html and "1 result" in html
    assert "By status" in html and "By architecture" in html


def test_quantize_to_on_a_ready_card_adds_the_new_formats_card(signed_in, redis_clean, settings):
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}  # fmt: skip
    source = make_model(quantization="FP32", architecture="llama", architecture_config=config, params_count=1)
    source.raw_dir.mkdir(parents=True)
    assert "Quantize to…" in card_html(signed_in, source)
    response = signed_in.post(f"/models/{source.id}/quantize", {"quantization": "Q4"}, HTTP_HX_REQUEST="true")
    html = response.content.decode()
    new = Model.objects.exclude(pk=source.pk).get()
    assert response.status_code == 200
    assert (new.requested_quantization, new.status, new.snapshot_of) == ("Q4", "queued", source.id)
    assert f'id="model-card-{new.id}"' in html and f'id="model-card-{source.id}"' in html


def test_quantize_to_the_same_format_shows_why_on_the_card(signed_in):
    source = make_model(quantization="Q4", architecture="llama", architecture_config={"model_type": "llama"})
    source.raw_dir.mkdir(parents=True)
    response = signed_in.post(f"/models/{source.id}/quantize", {"quantization": "Q4"}, HTTP_HX_REQUEST="true")
    assert response.status_code == 400 and response["HX-Retarget"] == f"#model-card-{source.id}"
    assert "already is Q4" in response.content.decode()
    assert Model.objects.count() == 1


def test_actions_on_a_model_deleted_in_another_tab_drop_its_card_instead_of_failing(signed_in):
    headers = {"HTTP_HX_REQUEST": "true"}
    for action in ("cancel", "delete", "quantize"):
        response = signed_in.post(f"/models/m_000000000000/{action}", {"quantization": "Q4"}, **headers)
        assert response.status_code == 200 and response.content == b"", action
    assert signed_in.get("/models/m_000000000000/architecture").status_code == 404


def test_with_1000_models_the_page_shows_20_cards_and_loads_the_rest_on_demand(signed_in):
    Model.objects.bulk_create([Model(name=f"model-{i:04d}", status="ready", quantization="FP16") for i in range(1000)])
    page = signed_in.get("/").content.decode()
    assert len(page.encode()) < 100_000
    assert page.count('id="model-card-') == 20 and 'id="more-models"' in page
    more = signed_in.get("/models/more?page=2").content.decode()
    assert more.count('id="model-card-') == 20 and "page=3" in more
    last = signed_in.get("/models/more?page=50").content.decode()
    assert last.count('id="model-card-') == 20 and 'id="more-models"' not in last
    assert signed_in.get("/models/more?page=%00").status_code == 400
    assert signed_in.get("/models/more?page=abc").status_code == 400


@pytest.mark.django_db(transaction=True)
def test_a_new_model_reaches_open_pages_as_its_card_alone(user, redis_clean, django_capture_on_commit_callbacks):
    import asyncio

    from channels.layers import get_channel_layer

    from mistudio.progress import MODELS_GROUP
    from models_app import services

    Model.objects.bulk_create([Model(name=f"model-{i}", status="ready") for i in range(300)])
    layer = get_channel_layer()

    async def listen():
        channel = await layer.new_channel()
        await layer.group_add(MODELS_GROUP, channel)
        return channel

    loop = asyncio.new_event_loop()
    try:
        channel = loop.run_until_complete(listen())
        with django_capture_on_commit_callbacks(execute=True):
            model = services.request_download(user=user, repo_id="tiny/llama", quantization="FP16")
        message = loop.run_until_complete(asyncio.wait_for(layer.receive(channel), 10))
    finally:
        loop.close()
    html = message["html"]
    assert 'hx-swap-oob="afterbegin:#model-list"' in html and f'id="model-card-{model.id}"' in html
    assert html.count('id="model-card-') == 1 and len(html.encode()) < 10_000


def test_quantize_to_starts_on_the_next_smaller_format(signed_in):
    from models_app.models import Model

    for current, expected in (("FP32", "FP16"), ("FP16", "Q8"), ("Q4", "Q2")):
        model = Model.objects.create(name=f"m-{current}", status="ready", quantization=current, architecture="llama",
                                     architecture_config={"model_type": "llama"})  # fmt: skip
        html = model.card_html()
        assert f'<option value="{expected}" selected>' in html, current
        assert html.count(" selected>") == 1


@pytest.mark.parametrize(
    ("perplexity", "band", "shown"),
    [(21.5, "close to FP32", "+2.4 % vs FP32"), (25.0, "caution: quality loss", "+19.0 % vs FP32"),
     (2_541_300.0, "unusable for analysis", "×121,014 vs FP32")],
)  # fmt: skip
def test_a_quantized_card_shows_its_format_badge_and_its_perplexity_band_against_fp32(signed_in, perplexity, band, shown):
    source = make_model(status="ready", quantization="FP32", name="SmolLM2-135M")
    model = make_model(status="ready", quantization="Q2", perplexity=perplexity, perplexity_baseline=21.0, snapshot_of=source.id)
    html = card_html(signed_in, model)
    assert re.search(r'class="format-badge[^"]*">Q2</span>', html)
    assert band in html and shown in html
    assert "12105137" not in html and "+12" not in html.split("quality")[1][:40]
    assert f'href="#model-card-{source.id}"' in html and "variant of SmolLM2-135M FP32" in html


def test_the_delete_confirm_names_the_extractions_that_will_remain(signed_in):
    from activations_app.models import Extraction

    model = make_model(status="ready", quantization="FP32")
    runs = [Extraction.objects.create(model=model, layers=[0], hook_types=["residual"], batch_size=1, max_samples=1, seq_len=8)
            for _ in range(2)]  # fmt: skip
    html = card_html(signed_in, model)
    newest_first = ", ".join(run.id for run in reversed(runs))
    assert f"Its 2 extractions stay: {newest_first}." in html
    assert f'href="/extractions/?model_id={model.id}" class="underline extraction-history">2 extractions</a>' in html


def test_an_estimate_is_marked_as_one_and_an_fp32_card_shows_the_baseline_its_formats_compare_with(signed_in):
    """Issue 19, item 6: a memory figure nobody measured says it is the estimate, and the
    FP32 card shows its own perplexity, the baseline the quantized cards compare with."""
    fp32 = make_model(params_count=134_515_008, quantization="FP32", memory_required_bytes=645_672_038)
    html = card_html(signed_in, fp32)
    assert "≈ 646MB memory (estimate)" in html and "ppl" not in html.split(f'id="model-card-{fp32.id}"')[1].split("</article>")[0]
    make_model(quantization="Q4", snapshot_of=fp32.id, perplexity=29.12, perplexity_baseline=23.85, memory_measured_bytes=1)
    html = signed_in.get("/").content.decode()
    fp32_card = html.split(f'id="model-card-{fp32.id}"')[1]
    assert "ppl 23.85 (FP32: the baseline the other formats compare with)" in fp32_card.split('id="model-card-')[0]
    assert "ppl 29.12 (+22.1 % vs FP32)" in html


@pytest.mark.django_db(transaction=True)
def test_a_quantization_says_which_step_it_is_in_and_its_bar_moves_through_the_perplexity(tiny_model, settings):
    """Issue 19, item 5: the quantizing phase names its steps (FP32's reference pass, the
    weights, the new format's perplexity and fidelity) and its progress moves window by window
    through them, where it sat at 60 % for the whole perplexity run."""
    from models_app import jobs, services

    settings.PERPLEXITY_MAX_TOKENS = 4 * 256  # four windows per figure: the bar has steps to take
    made = services.request_quantize(user=None, model_id=tiny_model.id, quantization="FP16", enqueue=False)
    seen = []
    jobs.run_quantize(made.id, listener=lambda row: seen.append((row.status, round(row.progress, 1), row.phase_label)))
    made.refresh_from_db()
    assert made.status == "ready" and made.perplexity is not None and made.perplexity_baseline is not None
    steps = [(progress, label) for status, progress, label in seen if status == "quantizing"]
    labels = list(dict.fromkeys(label for _, label in steps))
    assert labels == ["Running FP32 on the shipped text (the reference)", "Quantizing",
                      "Measuring perplexity and fidelity by layer on the shipped text"], steps  # fmt: skip
    for step in ("Running", "Measuring"):
        moving = [progress for progress, label in steps if label.startswith(step)]
        assert len(set(moving)) >= 2 and moving == sorted(moving), steps  # it moves, and never back


@pytest.mark.django_db(transaction=True)
def test_a_queued_card_says_its_place_in_line(signed_in, redis_clean):
    """Issue 19, item 5: 'Queued' with no sign it waits behind another job; the card now
    says where it is in the queue (no worker runs here, so both jobs wait)."""
    for repo in ("HuggingFaceTB/SmolLM2-135M", "tiny/llama"):
        response = signed_in.post("/models/download", {"repo_id": repo, "quantization": "FP32"}, HTTP_HX_REQUEST="true")
        assert response.status_code == 200, response.content[:300]
    first, second = Model.objects.order_by("created_at")
    html = signed_in.get("/").content.decode()
    for model, place in ((first, "1st"), (second, "2nd")):
        card = html.split(f'id="model-card-{model.id}"')[1].split('id="model-card-')[0]
        assert re.search(rf'waiting-note">· {place} in line for (any worker|the \w+ workers)<', card), card[:2000]
