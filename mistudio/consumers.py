"""What every WebSocket consumer shares: a signed-in user (the Origin is checked in
ws_auth), the current state sent on every (re)connect, then whatever the jobs publish."""

import json
import re

from channels.generic.websocket import AsyncWebsocketConsumer

from .progress import session_group

CLOSE_UNAUTHENTICATED = 4401
CLOSE_NOT_FOUND = 4404
# Every record id the server generates: a short prefix and hex (m_…, ds_…, ext_…).
ROW_ID = re.compile(r"[a-z]{1,3}_[0-9a-f]{1,32}")


class SignedInConsumer(AsyncWebsocketConsumer):
    groups_to_join: list[str] = []
    # Handlers that only forward what a job published and never touch the database.
    # Channels' dispatch closes stale database connections before every handler, a hop to
    # the sync thread per message and socket: with 500 sockets on one event, that hop was
    # the fan-out's largest cost (scripts/bench, the WebSocket row).
    FORWARDING = frozenset({"html.fragment", "json.event", "session.ended"})

    async def dispatch(self, message):
        if message["type"] in self.FORWARDING:
            await getattr(self, message["type"].replace(".", "_"))(message)
        else:
            await super().dispatch(message)

    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        # Join before reading the state: an event published in between is then delivered
        # after the state (events carry absolute state, so a repeat is harmless), never lost.
        self.groups_to_join = self.group_names()
        session = self.scope.get("session")
        if session is not None and session.session_key:
            self.groups_to_join.append(session_group(session.session_key))  # signing out closes it
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

    async def session_ended(self, message):
        await self.close(code=CLOSE_UNAUTHENTICATED)


class NoSuchSocket(AsyncWebsocketConsumer):
    """Any path no app mounts: closed with 4404, not a server error."""

    async def connect(self):
        await self.close(code=CLOSE_NOT_FOUND)


class HtmlFragmentsConsumer(SignedInConsumer):
    """Card HTML for a page, swapped out-of-band by element id; first the whole list."""

    group: str

    def group_names(self) -> list[str]:
        return [self.group]

    async def html_fragment(self, message):
        await self.send(text_data=message["html"])


class RowEventsConsumer(SignedInConsumer):
    """JSON events about the row whose id is in the URL, for programmatic clients."""

    url_kwarg: str

    def row_id(self) -> str | None:
        """The id from the URL when it has an id's shape (a group name is built from it)."""
        row_id = self.scope["url_route"]["kwargs"][self.url_kwarg]
        return row_id if ROW_ID.fullmatch(row_id) else None

    def group_names(self) -> list[str]:
        return [self.event_group(self.row_id())] if self.row_id() else []

    def event_group(self, row_id: str) -> str:
        raise NotImplementedError

    async def initial_message(self) -> str | None:
        if self.row_id() is None:
            return None
        state = await self.current_state(self.row_id())
        return None if state is None else json.dumps(state)

    async def current_state(self, row_id: str) -> dict | None:
        """The event describing the row now; None when there is no such row."""
        raise NotImplementedError

    async def json_event(self, message):
        await self.send(text_data=json.dumps(message["event"]))
