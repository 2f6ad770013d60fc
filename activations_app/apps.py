from django.apps import AppConfig


class ActivationsAppConfig(AppConfig):
    name = "activations_app"
    verbose_name = "Activations"  # the admin's heading (else "Activations_App")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from mistudio import jobs

        from .models import Dataset, Export, Extraction

        jobs.register(Extraction)  # their rows fail like every kind's when their worker dies
        jobs.register(Dataset)
        jobs.register(Export)
