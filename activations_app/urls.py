from django.urls import path

from . import api, views

app_name = "activations"

urlpatterns = [
    path("datasets/", views.datasets_page, name="datasets"),
    path("datasets/upload", views.dataset_upload, name="dataset-upload"),
    path("datasets/import", views.dataset_import, name="dataset-import"),
    path("datasets/<str:dataset_id>", views.dataset_detail, name="dataset"),
    path("datasets/<str:dataset_id>/tokens", views.dataset_tokens, name="dataset-tokens"),
    path("datasets/<str:dataset_id>/cancel", views.dataset_cancel, name="dataset-cancel"),
    path("datasets/<str:dataset_id>/retry", views.dataset_retry, name="dataset-retry"),
    path("datasets/<str:dataset_id>/delete", views.dataset_delete, name="dataset-delete"),
    path("extractions/", views.extractions_page, name="extractions"),
    path("extractions/<str:extraction_id>", views.extraction_detail, name="extraction"),
    path("extractions/<str:extraction_id>/cancel", views.extraction_cancel, name="extraction-cancel"),
    path("extractions/<str:extraction_id>/resume", views.extraction_resume, name="extraction-resume"),
    path("extractions/<str:extraction_id>/retry", views.extraction_retry, name="extraction-retry"),
    path("extractions/<str:extraction_id>/delete", views.extraction_delete, name="extraction-delete"),
    path("models/<str:model_id>/extract", views.extraction_dialog, name="dialog"),
    path("models/<str:model_id>/extract/estimate", views.extraction_estimate, name="estimate"),
    path("models/<str:model_id>/extract/start", views.extraction_start, name="start"),
    path("models/<str:model_id>/extract/templates", views.template_save, name="template-save"),
    path("models/<str:model_id>/extract/templates/favourite", views.template_favourite, name="template-favourite"),
    path("models/<str:model_id>/extract/templates/delete", views.template_delete, name="template-delete"),
    path("api/models/<str:model_id>/extract", api.extract, name="api-extract"),
    path("api/models/<str:model_id>/extraction-templates", api.template_save, name="api-template-save"),
    path("api/extraction-templates", api.templates, name="api-templates"),
    path("api/extraction-templates/<str:template_id>", api.template_detail, name="api-template"),
    path("api/extraction-templates/<str:template_id>/favourite", api.template_favourite, name="api-template-favourite"),
    path("api/datasets", api.datasets, name="api-datasets"),
    path("api/datasets/<str:dataset_id>", api.dataset_detail, name="api-dataset"),
    path("api/datasets/<str:dataset_id>/cancel", api.dataset_cancel, name="api-dataset-cancel"),
    path("api/datasets/<str:dataset_id>/retry", api.dataset_retry, name="api-dataset-retry"),
    path("api/extractions", api.extractions, name="api-extractions"),
    path("api/extractions/<str:extraction_id>", api.extraction_detail, name="api-extraction"),
    path("api/extractions/<str:extraction_id>/cancel", api.extraction_cancel, name="api-extraction-cancel"),
    path("api/extractions/<str:extraction_id>/retry", api.extraction_retry, name="api-extraction-retry"),
    path("api/extractions/<str:extraction_id>/resume", api.extraction_resume, name="api-extraction-resume"),
    path("api/extractions/<str:extraction_id>/export", api.extraction_export, name="api-extraction-export"),
    path("extractions/<str:extraction_id>/export", views.extraction_export, name="extraction-export"),
]
