"""Outlier report (issue 18, item 3): per file, the tokens whose norm is above k x the
median of the counted tokens, their share and the ten largest with their place and text,
checked against numpy over the saved files of a real SmolLM2 run; with the `exclude` rule
they leave the statistics, and the export leaves out the rows that hold them."""

from __future__ import annotations

import html
import json

import numpy as np
import pytest

from activations_app import jobs, services
from activations_app.models import Export, ExtractionStatus
from activations_app.tests.test_resume import dataset  # noqa: F401 - fixture

pytestmark = pytest.mark.django_db(transaction=True)
FACTOR = 9  # layer 3 of SmolLM2 holds, in most rows, a token at 7-9x the median norm; two rows here go above 9x


def test_outliers_are_reported_as_numpy_finds_them_and_excluded_from_statistics_and_export(smollm2_model, dataset, signed_in):  # noqa: F811
    from transformers import AutoTokenizer

    extraction = services.request_extraction(
        model_id=smollm2_model.id, dataset_id=dataset["id"], enqueue=False, layers=[3, 15], hook_types=["residual"],
        max_samples=16, batch_size=8, seq_len=32, outlier_factor=FACTOR, outliers="exclude",
    )  # fmt: skip
    jobs.run_extraction_job(extraction.id)
    extraction.refresh_from_db()
    assert extraction.status == ExtractionStatus.COMPLETED, extraction.error_message
    out = extraction.final_dir
    tokens = np.load(out / "tokens.npy")
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["outliers"]["factor"] == FACTOR and metadata["outliers"]["rule"] == "exclude"
    assert metadata["statistics_exclude"][-1].startswith(f"outliers (norm above {FACTOR}x")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_model.weights_dir)
    counted = np.ones(tokens.shape, dtype=bool)
    counted[:, 0] = False
    counted &= tokens != 1  # BOS
    rows_with_outliers = np.zeros(len(tokens), dtype=bool)
    for stem in ("layer_3_residual", "layer_15_residual"):
        values = np.load(out / f"{stem}.npy").astype(np.float64)
        norms = np.linalg.norm(values, axis=2)
        saved = np.load(out / f"{stem}.norms.npy")
        assert np.isnan(saved[~counted]).all()
        np.testing.assert_allclose(saved[counted], norms[counted], rtol=1e-6)
        median = np.median(norms[counted])
        above = counted & (norms > FACTOR * median)
        report = extraction.statistics[stem]["outliers"]
        assert report["median_norm"] == pytest.approx(median, rel=1e-6)
        assert report["count"] == above.sum() and report["share"] == pytest.approx(above.sum() / counted.sum())
        largest = np.sort(norms[counted])[::-1][:10]  # (equal norms, the same token at the same place, may come in either order)
        assert [t["norm"] for t in report["largest"]] == pytest.approx(largest.tolist(), rel=1e-6)
        for t in report["largest"]:
            assert counted[t["row"], t["position"]] and t["norm"] == pytest.approx(norms[t["row"], t["position"]], rel=1e-6)
            assert t["token_id"] == tokens[t["row"], t["position"]] and t["token"] == tokenizer.decode([t["token_id"]])
            assert t["times_median"] == pytest.approx(t["norm"] / median, rel=1e-6)
        # Left out of the statistics: numpy over the counted tokens that are not outliers.
        kept = counted & ~above
        figures = extraction.statistics[stem]
        assert figures["tokens"] == kept.sum()
        assert figures["norm_scaling_factor"] == pytest.approx(np.sqrt(576) / norms[kept].mean(), rel=1e-9)
        assert figures["mean_l2_norm"] == pytest.approx(norms[kept].mean(), rel=1e-9)
        rows_with_outliers |= above.any(axis=1)
    assert 0 < rows_with_outliers.sum() < len(tokens), "the test needs rows with and without outliers"

    page = html.unescape(signed_in.get(f"/extractions/{extraction.id}").content.decode())
    assert "Outlier tokens" in page and f"above {FACTOR}× their file's median" in page and "Left out of the statistics" in page
    first = extraction.statistics["layer_15_residual"]["outliers"]["largest"][0]
    assert f"{first['row']}:{first['position']}" in page

    # The export leaves out every row that holds an outlier in any hook, in every hook alike.
    import datasets

    export = services.export_extraction(extraction.id, None, enqueue=False, naming="hf")
    jobs.run_export_job(export.id)
    export = Export.objects.get(pk=export.id)
    assert export.status == "completed", export.error_message
    record = json.loads((export.out_dir / "export.json").read_text())
    assert record["outliers"]["rule"] == "exclude" and record["outliers"]["rows_left_out"] == rows_with_outliers.sum()
    kept_rows = np.flatnonzero(~rows_with_outliers)
    assert np.array_equal(np.load(export.out_dir / "row_order.npy"), kept_rows)
    for name, stem in (("model.layers.3", "layer_3_residual"), ("model.layers.15", "layer_15_residual")):
        loaded = datasets.load_from_disk(str(export.out_dir / name)).with_format("numpy")
        assert len(loaded) == len(kept_rows)
        np.testing.assert_array_equal(loaded[name][:], np.load(out / f"{stem}.npy")[kept_rows])
        np.testing.assert_array_equal(loaded["token_ids"][:], tokens[kept_rows])
