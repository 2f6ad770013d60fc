"""Who may open a WebSocket.

Browsers sign in with the session cookie and must come from an allowed Origin (the cookie
would otherwise ride along on another site's page). Programmatic clients of
/ws/models/{id}/progress send no Origin; they present `Authorization: Bearer <token>`, the
same API token the JSON API takes, which a browser page cannot attach to a WebSocket."""

from urllib.parse import urlsplit

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.security.websocket import AllowedHostsOriginValidator, WebsocketDenier
from django.conf import settings
from django.contrib.auth.models import AnonymousUser

from .models import ApiToken


@database_sync_to_async
def token_for(raw: str):
    return ApiToken.token_for(raw)


def same_origin(headers: dict) -> bool:
    """A browser's socket comes from the page's own origin: the Origin's host *and port*
    equal the Host it connected to (or it is one of CSRF_TRUSTED_ORIGINS, behind a proxy).
    Another port of an allowed host is another site."""
    origin = headers.get(b"origin", b"").decode("latin-1")
    host = headers.get(b"host", b"").decode("latin-1")
    if not host:  # no Host header: no browser sent this; the allowed-hosts check decides
        return True
    return urlsplit(origin).netloc.lower() == host.lower() or origin in settings.CSRF_TRUSTED_ORIGINS


class WebsocketAuth:
    def __init__(self, inner) -> None:
        self.inner = inner
        self.browser = AllowedHostsOriginValidator(AuthMiddlewareStack(inner))

    async def __call__(self, scope, receive, send):
        headers = dict(scope.get("headers", []))
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        if authorization.startswith("Bearer "):
            token = await token_for(authorization.removeprefix("Bearer ").strip())
            # No token: anonymous, which the consumer closes with 4401. The token's id stays
            # in the scope: deleting it closes the socket (consumers.SignedInConsumer).
            user = token.user if token is not None else AnonymousUser()
            return await self.inner(dict(scope, user=user, api_token_id=token.pk if token else None), receive, send)
        if not same_origin(headers):
            return await WebsocketDenier()(scope, receive, send)
        return await self.browser(scope, receive, send)
