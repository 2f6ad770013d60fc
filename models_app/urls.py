from django.urls import path

from activations_app import api as activations_api

from . import api, views

app_name = "models"

urlpatterns = [
    path("", views.panel, name="panel"),
    path("models/download", views.download, name="download"),
    path("models/estimate", views.estimate, name="estimate"),
    path("models/<str:model_id>/cancel", views.cancel, name="cancel"),
    path("models/<str:model_id>/delete", views.delete, name="delete"),
    path("models/<str:model_id>/quantize", views.quantize, name="quantize"),
    path("models/<str:model_id>/architecture", views.architecture, name="architecture"),
    path("api/models", api.models_collection, name="api-models"),
    path("api/models/download", api.download, name="api-download"),
    path("api/models/estimate", api.estimate, name="api-estimate"),
    path("api/models/<str:model_id>", api.model_detail, name="api-model"),
    path("api/models/<str:model_id>/cancel", api.model_cancel, name="api-cancel"),
    path("api/models/<str:model_id>/quantize", api.model_quantize, name="api-quantize"),
    path("api/models/<str:model_id>/architecture", api.model_architecture, name="api-architecture"),
    path("api/models/<str:model_id>/extract", activations_api.extract, name="api-extract"),
    path("api/datasets", activations_api.datasets, name="api-datasets"),
    path("api/datasets/<str:dataset_id>", activations_api.dataset_detail, name="api-dataset"),
    path("api/extractions", activations_api.extractions, name="api-extractions"),
    path("api/extractions/<str:extraction_id>", activations_api.extraction_detail, name="api-extraction"),
]
