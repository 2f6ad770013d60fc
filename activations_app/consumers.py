"""/ws/models/{id}/extraction (extraction_progress / extraction_completed events of the
model's extractions, first the latest one's state), /ws/datasets/ and /ws/extractions/
(card HTML)."""

from channels.db import database_sync_to_async

from mistudio.consumers import ROW_ID, HtmlFragmentsConsumer, RowEventsConsumer
from mistudio.errors import NotFound
from mistudio.progress import DATASETS_GROUP, EXTRACTIONS_GROUP, model_group
from models_app.services import get_model

from .forms import DatasetFilters, ExtractionFilters
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

    def filters(self) -> DatasetFilters:
        return DatasetFilters(self.query())

    def frame_key(self) -> tuple:
        return (self.filters().query(),)

    def render_frame(self) -> str:
        return Dataset.list_html(oob=True, filters=self.filters())


def _extractions_state(query) -> str | None:
    """What the page shows now: one extraction's detail body, or the (filtered) list."""
    extraction_id = query.get("extraction", "")
    if extraction_id:
        extraction = Extraction.rows().filter(pk=extraction_id).first() if ROW_ID.fullmatch(extraction_id) else None
        return extraction.detail_html(oob=True) if extraction else None
    return Extraction.list_html(oob=True, filters=ExtractionFilters(query))


class ExtractionsConsumer(HtmlFragmentsConsumer):
    """/ws/extractions/ (?model_id= for one model's list, ?extraction= for a detail page):
    cards as they change, new ones first in the list, a detail page's whole body."""

    group = EXTRACTIONS_GROUP

    def frame_key(self) -> tuple:
        query = self.query()
        return (query.get("extraction", "")[:40], ExtractionFilters(query).query())

    def render_frame(self) -> str | None:
        return _extractions_state(self.query())
