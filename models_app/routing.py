from django.urls import path

from . import consumers

websocket_urlpatterns = [
    path("ws/models/", consumers.ModelsConsumer.as_asgi()),
    path("ws/models/<str:model_id>/progress", consumers.ModelProgressConsumer.as_asgi()),
]
