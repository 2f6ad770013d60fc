"""Who may open a WebSocket.

Browsers sign in with the session cookie and must come from an allowed Origin (the cookie
would otherwise ride along on another site's page). Programmatic clients of
/ws/models/{id}/progress send no Origin; they present `Authorization: Bearer <token>`, the
same API token the JSON API takes, which a browser page cannot attach to a WebSocket."""

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.security.websocket import AllowedHostsOriginValidator
from django.contrib.auth.models import AnonymousUser

from .models import ApiToken


@database_sync_to_async
def user_for_token(raw: str):
    return ApiToken.user_for(raw) or AnonymousUser()  # the consumer closes an anonymous one with 4401


class WebsocketAuth:
    def __init__(self, inner) -> None:
        self.inner = inner
        self.browser = AllowedHostsOriginValidator(AuthMiddlewareStack(inner))

    async def __call__(self, scope, receive, send):
        authorization = dict(scope.get("headers", [])).get(b"authorization", b"").decode("latin-1")
        if authorization.startswith("Bearer "):
            user = await user_for_token(authorization.removeprefix("Bearer ").strip())
            return await self.inner(dict(scope, user=user), receive, send)
        return await self.browser(scope, receive, send)
