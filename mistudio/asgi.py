import os
from importlib import import_module

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mistudio.settings")
os.environ.setdefault("MISTUDIO_DB_POOL", "1")  # a bounded pool for the server's request threads (settings.py)
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402  (needs Django set up)
from django.apps import apps  # noqa: E402
from django.urls import re_path  # noqa: E402
from django.utils.module_loading import module_has_submodule  # noqa: E402

from mistudio.consumers import ChannelLayerGuard, NoSuchSocket  # noqa: E402
from mistudio.ws_auth import WebsocketAuth  # noqa: E402


def websocket_urlpatterns() -> list:
    """Every installed app's `routing.websocket_urlpatterns`: each app mounts its own sockets."""
    return [
        pattern
        for config in apps.get_app_configs()
        if module_has_submodule(config.module, "routing")
        for pattern in getattr(import_module(f"{config.name}.routing"), "websocket_urlpatterns", [])
    ]


application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": ChannelLayerGuard(WebsocketAuth(URLRouter([*websocket_urlpatterns(), re_path(r"", NoSuchSocket.as_asgi())]))),
    }
)
