"""Open sockets do not outlive what HTTP would refuse (issue 17, item 10): deleting the API
token a socket presented, deactivating its user or changing their password closes it (4401)
within seconds, while a session that survived the password change (the one that changed
it) keeps its socket."""

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import HASH_SESSION_KEY
from django.contrib.sessions.backends.db import SessionStore

from mistudio.asgi import application
from mistudio.models import ApiToken
from models_app.tests.test_consumers import session_cookie, socket

pytestmark = pytest.mark.django_db(transaction=True)


def token_socket(raw: str) -> WebsocketCommunicator:
    return WebsocketCommunicator(application, "/ws/models/", headers=[(b"authorization", f"Bearer {raw}".encode())])


async def opened(communicator) -> WebsocketCommunicator:
    connected, _ = await communicator.connect(timeout=10)
    assert connected
    await communicator.receive_from(timeout=10)  # the current state
    return communicator


async def closed_with_4401(communicator) -> bool:
    message = await communicator.receive_output(timeout=5)  # the acceptance: within 5 s
    return message == {"type": "websocket.close", "code": 4401}


async def test_a_deleted_token_and_a_deactivated_user_close_their_sockets(user, django_user_model):
    token, raw = await database_sync_to_async(ApiToken.issue)(user, "script")
    _, other_raw = await database_sync_to_async(ApiToken.issue)(user, "other")
    by_token, by_other = await opened(token_socket(raw)), await opened(token_socket(other_raw))
    await database_sync_to_async(token.delete)()
    assert await closed_with_4401(by_token)
    assert await by_other.receive_nothing(timeout=1)  # its own token still stands

    def deactivate():
        user.is_active = False
        user.save()

    await database_sync_to_async(deactivate)()
    assert await closed_with_4401(by_other)


async def test_a_password_change_closes_the_other_sessions_sockets_and_keeps_the_one_that_changed_it(user):
    stale, current = await database_sync_to_async(session_cookie)(user), await database_sync_to_async(session_cookie)(user)
    old_session, kept_session = await opened(socket("/ws/models/", stale)), await opened(socket("/ws/models/", current))

    def change_password():
        user.set_password("a-new-password-for-the-test")
        session = SessionStore(current)  # what update_session_auth_hash does for the session that changed it
        session[HASH_SESSION_KEY] = user.get_session_auth_hash()
        session.save()
        user.save()

    await database_sync_to_async(change_password)()
    assert await closed_with_4401(old_session)
    assert await kept_session.receive_nothing(timeout=1)
    await kept_session.disconnect()
