from django.urls import path

from . import consumers

websocket_urlpatterns = [
    path("ws/datasets/", consumers.DatasetsConsumer.as_asgi()),
    path("ws/extractions/", consumers.ExtractionsConsumer.as_asgi()),
    path("ws/models/<str:model_id>/extraction", consumers.ExtractionProgressConsumer.as_asgi()),
]
