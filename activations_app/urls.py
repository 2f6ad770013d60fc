from django.urls import path

from . import views

app_name = "activations"

urlpatterns = [
    path("datasets/", views.datasets_page, name="datasets"),
    path("datasets/upload", views.dataset_upload, name="dataset-upload"),
    path("datasets/<str:dataset_id>/delete", views.dataset_delete, name="dataset-delete"),
    path("extractions/", views.extractions_page, name="extractions"),
    path("extractions/<str:extraction_id>", views.extraction_detail, name="extraction"),
    path("extractions/<str:extraction_id>/cancel", views.extraction_cancel, name="extraction-cancel"),
    path("models/<str:model_id>/extract", views.extraction_dialog, name="dialog"),
    path("models/<str:model_id>/extract/estimate", views.extraction_estimate, name="estimate"),
    path("models/<str:model_id>/extract/start", views.extraction_start, name="start"),
]
