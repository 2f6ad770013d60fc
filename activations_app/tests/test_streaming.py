"""Hub datasets without the whole download: an import reads the parquet footers and the
first rows; an extraction then reads only the row groups that cover its samples, over HTTP
Range through the Hub client's filesystem, measured from the loopback Hub's request log."""

import numpy as np
import pytest

from activations_app import jobs, services
from activations_app.models import DatasetStatus, ExtractionStatus
from models_app.tests.hub_server import HubRepo, make_sha

pytestmark = pytest.mark.django_db(transaction=True)

ROWS, ROW_CHARS = 20_000, 10_000  # 200 MB of text


@pytest.fixture(scope="session")
def big_parquet_repo(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("big-corpus")
    (folder / "data").mkdir()
    rng = np.random.default_rng(0)
    letters = rng.integers(97, 123, size=(ROWS, ROW_CHARS), dtype=np.uint8)
    letters[:, ::7] = 32  # words of six letters
    texts = pa.array([row.tobytes().decode() for row in letters], type=pa.string())
    pq.write_table(pa.table({"text": texts}), folder / "data" / "train-00000-of-00001.parquet",
                   row_group_size=200, compression="none")  # fmt: skip
    return folder


def test_a_1000_sample_extraction_from_a_200_mb_hub_parquet_reads_under_5_percent_of_it(
    hub, big_parquet_repo, smollm2_model, data_dir
):
    hub.add_repo(HubRepo("corpora/big", big_parquet_repo, make_sha("corpora/big"), repo_type="dataset"))
    size = (big_parquet_repo / "data" / "train-00000-of-00001.parquet").stat().st_size
    assert size >= 200_000_000

    dataset = services.import_dataset(path="corpora/big", enqueue=False)
    jobs.run_dataset_import(dataset.id)
    dataset.refresh_from_db()
    assert dataset.status == DatasetStatus.READY, dataset.error_message
    assert (dataset.storage, dataset.row_count, len(dataset.preview)) == ("stream", ROWS, 5)
    assert not (data_dir / "datasets" / dataset.id).exists()  # nothing downloaded
    import_bytes = sum(r.body_bytes for r in hub.requests)
    assert import_bytes < 0.02 * size, import_bytes

    hub.clear_log()
    extraction = services.request_extraction(model_id=smollm2_model.id, dataset_id=dataset.id, enqueue=False,
                                             layers=[0], hook_types=["residual"], max_samples=1000, seq_len=16,
                                             batch_size=100)  # fmt: skip
    jobs.run_extraction_job(extraction.id)
    extraction.refresh_from_db()
    assert extraction.status == ExtractionStatus.COMPLETED, extraction.error_message
    assert np.load(extraction.final_dir / "layer_0_residual.npy", mmap_mode="r").shape == (1000, 16, 576)
    read = sum(r.body_bytes for r in hub.requests)
    ranged = [r for r in hub.requests if "/resolve/" in r.path]
    assert ranged and all(r.range for r in ranged)  # every data read was a Range request
    print(f"\nstreamed extraction: read {read:,} of {size:,} bytes ({100 * read / size:.2f} %) in {len(ranged)} requests")
    assert read < 0.05 * size, read
