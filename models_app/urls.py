from django.urls import path

from . import api, views

app_name = "models"

urlpatterns = [
    path("", views.panel, name="panel"),
    path("models/download", views.download, name="download"),
    path("models/estimate", views.estimate, name="estimate"),
    path("models/more", views.more_models, name="more"),
    path("models/<str:model_id>/cancel", views.cancel, name="cancel"),
    path("models/<str:model_id>/delete", views.delete, name="delete"),
    path("models/<str:model_id>/retry", views.retry, name="retry"),
    path("models/<str:model_id>/quantize", views.quantize, name="quantize"),
    path("models/<str:model_id>/architecture", views.architecture, name="architecture"),
    path("models/<str:model_id>/verify", views.verify, name="verify"),
    path("api/models", api.models_collection, name="api-models"),
    path("api/models/download", api.download, name="api-download"),
    path("api/models/estimate", api.estimate, name="api-estimate"),
    path("api/models/<str:model_id>", api.model_detail, name="api-model"),
    path("api/models/<str:model_id>/cancel", api.model_cancel, name="api-cancel"),
    path("api/models/<str:model_id>/quantize", api.model_quantize, name="api-quantize"),
    path("api/models/<str:model_id>/retry", api.model_retry, name="api-retry"),
    path("api/models/<str:model_id>/verify", api.model_verify, name="api-verify"),
    path("api/models/<str:model_id>/architecture", api.model_architecture, name="api-architecture"),
]
