"""WebSocket consumers. Both require a signed-in user (the Origin is checked in asgi.py)
and send the current state on (re)connect, then whatever the jobs publish."""

import json
import re

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from mistudio.progress import MODELS_GROUP, model_group

from . import services
from .models import Model

CLOSE_UNAUTHENTICATED = 4401
CLOSE_NOT_FOUND = 4404
MODEL_ID = re.compile(r"m_[0-9a-f]{1,32}")


class SignedInConsumer(AsyncWebsocketConsumer):
    groups_to_join: list[str] = []

    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        # Join before reading the state: an event published in between is then delivered
        # after the state (events carry absolute state, so a repeat is harmless), never lost.
        self.groups_to_join = self.group_names()
        for group in self.groups_to_join:
            await self.channel_layer.group_add(group, self.channel_name)
        initial = await self.initial_message()
        if initial is None:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        await self.accept()
        await self.send(text_data=initial)

    async def disconnect(self, code):
        for group in self.groups_to_join:
            await self.channel_layer.group_discard(group, self.channel_name)

    def group_names(self) -> list[str]:
        return []

    async def initial_message(self) -> str | None:
        raise NotImplementedError

    async def receive(self, text_data=None, bytes_data=None):
        """The page sends nothing we act on; state changes go through HTTP."""


class ModelsConsumer(SignedInConsumer):
    """/ws/models/: card HTML for the page, swapped out-of-band by element id."""

    def group_names(self) -> list[str]:
        return [MODELS_GROUP]

    async def initial_message(self) -> str:
        return await database_sync_to_async(services.render_model_list)(oob=True)

    async def html_fragment(self, message):
        await self.send(text_data=message["html"])


class ModelProgressConsumer(SignedInConsumer):
    """/ws/models/{id}/progress: JSON events for programmatic clients."""

    channel = "progress"

    def model_id(self) -> str | None:
        """The id from the URL when it has an id's shape (a group name is built from it)."""
        model_id = self.scope["url_route"]["kwargs"]["model_id"]
        return model_id if MODEL_ID.fullmatch(model_id) else None

    def group_names(self) -> list[str]:
        return [model_group(self.model_id(), self.channel)] if self.model_id() else []

    async def initial_message(self) -> str | None:
        if self.model_id() is None:
            return None
        model = await Model.objects.filter(pk=self.model_id()).afirst()
        if model is None:
            return None
        return json.dumps(await self.current_state(model))

    async def current_state(self, model: Model) -> dict:
        return model.progress_event()

    async def json_event(self, message):
        await self.send(text_data=json.dumps(message["event"]))


class ExtractionProgressConsumer(ModelProgressConsumer):
    """/ws/models/{id}/extraction: extraction_progress / extraction_completed events."""

    channel = "extraction"

    async def current_state(self, model: Model) -> dict:
        from activations_app.jobs import extraction_event

        latest = await model.extractions.order_by("-created_at").afirst()
        return extraction_event(latest) if latest else {"type": "extraction_progress", "extraction_id": None}
