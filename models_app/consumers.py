"""/ws/models/ (card HTML for the Models page) and /ws/models/{id}/progress (JSON events)."""

from mistudio.consumers import HtmlFragmentsConsumer, RowEventsConsumer
from mistudio.progress import MODELS_GROUP, model_group

from .forms import ModelFilters
from .models import Model


class ModelsConsumer(HtmlFragmentsConsumer):
    """/ws/models/ (with the page's filters as its query): the list as the page shows it,
    then cards as they change."""

    group = MODELS_GROUP

    def filters(self) -> ModelFilters:
        return ModelFilters(self.query())

    def frame_key(self) -> tuple:
        return (self.filters().query(),)

    def render_frame(self) -> str:
        return Model.list_html(oob=True, filters=self.filters())


class ModelProgressConsumer(RowEventsConsumer):
    url_kwarg = "model_id"

    def event_group(self, row_id: str) -> str:
        return model_group(row_id)

    async def current_state(self, row_id: str) -> dict | None:
        model = await Model.objects.filter(pk=row_id).afirst()
        return model.progress_event() if model else None
