"""/ws/models/{id}/extraction (extraction_progress / extraction_completed events of the
model's extractions, first the latest one's state) and /ws/datasets/ (card HTML)."""

from channels.db import database_sync_to_async

from mistudio.consumers import HtmlFragmentsConsumer, RowEventsConsumer
from mistudio.errors import NotFound
from mistudio.progress import DATASETS_GROUP, model_group
from models_app.services import get_model

from .models import Dataset, Extraction


def _latest_event(model_id: str) -> dict | None:
    try:
        get_model(model_id)
    except NotFound:
        return None
    latest = Extraction.rows().filter(model_id=model_id).order_by("-created_at").first()
    return latest.progress_event() if latest else {"type": "extraction_progress", "extraction_id": None}


class ExtractionProgressConsumer(RowEventsConsumer):
    url_kwarg = "model_id"

    def event_group(self, row_id: str) -> str:
        return model_group(row_id, "extraction")

    async def current_state(self, row_id: str) -> dict | None:
        return await database_sync_to_async(_latest_event)(row_id)


class DatasetsConsumer(HtmlFragmentsConsumer):
    """/ws/datasets/: dataset cards for the Datasets page (imports from the Hub go live)."""

    group = DATASETS_GROUP

    async def initial_message(self) -> str:
        return await database_sync_to_async(Dataset.list_html)(oob=True)
