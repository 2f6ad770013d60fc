"""What every WebSocket consumer shares: a signed-in user (the Origin is checked in
ws_auth), the current state sent on every (re)connect, then whatever the jobs publish."""

import asyncio
import json
import logging
import re
import time

from channels.generic.websocket import AsyncWebsocketConsumer
from django.http import QueryDict

from channels.db import database_sync_to_async

from .progress import session_group, user_group

log = logging.getLogger(__name__)

CLOSE_TRY_AGAIN_LATER = 1013  # RFC 6455: the server is overloaded or a service it needs is down; htmx's ws reconnects
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
        # A deleted token, a deactivation or a new password makes it check itself (auth_changed).
        self.groups_to_join.append(user_group(user.pk))
        for group in self.groups_to_join:
            await self.channel_layer.group_add(group, self.channel_name)
        self.joined_at = time.monotonic()  # a shared first frame must have started rendering after this
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

    async def auth_changed(self, message):
        if not await database_sync_to_async(self.still_signed_in)():
            await self.close(code=CLOSE_UNAUTHENTICATED)

    def still_signed_in(self) -> bool:
        """What opened this socket still signs its user in: the user active, and the API
        token it presented not deleted, or its session not ended and made before no
        password change (Django's session hash, as HTTP checks it on every request)."""
        from django.contrib.auth import HASH_SESSION_KEY, get_user_model
        from django.utils.crypto import constant_time_compare

        from .models import ApiToken

        user = get_user_model().objects.filter(pk=self.scope["user"].pk, is_active=True).first()
        if user is None:
            return False
        token_id = self.scope.get("api_token_id")
        if token_id is not None:
            return ApiToken.objects.filter(pk=token_id, user=user).exists()
        session = self.scope.get("session")
        if session is None or not session.session_key:
            return False
        from importlib import import_module

        from django.conf import settings

        stored = import_module(settings.SESSION_ENGINE).SessionStore(session.session_key)  # as saved now, not at connect
        saved_hash = stored.get(HASH_SESSION_KEY)
        return bool(saved_hash) and constant_time_compare(saved_hash, user.get_session_auth_hash())


class NoSuchSocket(AsyncWebsocketConsumer):
    """Any path no app mounts: closed with 4404, not a server error."""

    async def connect(self):
        await self.close(code=CLOSE_NOT_FOUND)


class SharedFrames:
    """The first frame of a page socket (the whole list, the same for every signed-in user),
    shared by the sockets of this process that connect at once: 500 sockets opened together
    with 20 cards on the first page were 500 database reads and renders, and most handshakes
    timed out. A socket takes a render only if that render *began reading after the socket
    joined its group* (or has not begun yet): whatever changed before the render is in it,
    whatever changed after reaches the socket as a fragment, so no change is ever missed. A
    burst shares a handful of renders (each serves every socket that joined before it began:
    the database calls run one at a time, so renders wait their turn). Renders run as tasks of
    their own (a socket that goes away does not fail the others waiting on it)."""

    def __init__(self) -> None:
        self._frames: dict[tuple, tuple[dict, asyncio.Task]] = {}

    async def get(self, key: tuple, render, joined_at: float) -> str | None:
        """`render` (synchronous: it reads the database) for `key`, or the result of one that
        had not yet begun reading when this socket joined its group."""
        kept = self._frames.get(key)
        if kept is not None:
            began = kept[0]["at"]
            failed = kept[1].done() and kept[1].exception() is not None
            if failed or (began is not None and began < joined_at):
                kept = None
        if kept is None:
            began: dict = {"at": None}

            def timed():
                began["at"] = time.monotonic()  # what the render reads is as of now
                return render()

            kept = (began, asyncio.ensure_future(database_sync_to_async(timed)()))
            self._frames[key] = kept  # replaces one that no later socket could take
            # Once done it has begun, so no later socket can take it: the table holds renders in flight only.
            kept[1].add_done_callback(lambda _task, key=key, kept=kept: self._frames.pop(key) if self._frames.get(key) is kept else None)
        return await asyncio.shield(kept[1])


shared_frames = SharedFrames()


class HtmlFragmentsConsumer(SignedInConsumer):
    """Card HTML for a page, swapped out-of-band by element id; first the whole list (or a
    detail body), shared by the sockets that connect within a second (SharedFrames)."""

    group: str

    def group_names(self) -> list[str]:
        return [self.group]

    def query(self) -> QueryDict:
        """The socket URL's query: the filters of the page that opened it."""
        return QueryDict(self.scope.get("query_string", b"").decode("latin-1"))

    def frame_key(self) -> tuple:
        """What the first frame depends on besides the group (a query's filter)."""
        return ()

    def render_frame(self) -> str | None:
        """The first frame, from the database (a synchronous call); None: no such page."""
        raise NotImplementedError

    async def initial_message(self) -> str | None:
        return await shared_frames.get((self.group, *self.frame_key()), self.render_frame, self.joined_at)

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


class ChannelLayerGuard:
    """ASGI middleware for sockets: when the channel layer (Redis) cannot be reached, a
    socket gets a close code (1013, try again later) instead of the HTTP 500 that an
    exception in the handshake gives. A consumer subscribes its channel before it connects,
    so an outage fails there; the page's htmx ws reconnects with backoff on 1013, and the
    first connect after the outage sends the current state again."""

    def __init__(self, inner) -> None:
        self.inner = inner

    async def __call__(self, scope, receive, send):
        from redis.exceptions import RedisError

        state = {"accepted": False, "closed": False}

        async def tracked_send(message):
            if message["type"] == "websocket.accept":
                state["accepted"] = True
            elif message["type"] == "websocket.close":
                state["closed"] = True
            await send(message)

        try:
            return await self.inner(scope, receive, tracked_send)
        except (RedisError, OSError) as exc:
            log.warning("socket %s: the channel layer is unreachable (%s); closed with %d", scope.get("path"),
                        type(exc).__name__, CLOSE_TRY_AGAIN_LATER)  # fmt: skip
            if state["closed"]:
                return None
            if not state["accepted"]:  # a close before the accept would be a 403 to the handshake
                await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": CLOSE_TRY_AGAIN_LATER})
