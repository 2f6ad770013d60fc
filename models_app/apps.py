from django.apps import AppConfig


class ModelsAppConfig(AppConfig):
    name = "models_app"
    verbose_name = "Models"  # the admin's heading (else "Models_App")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from mistudio import jobs

        from .models import Model

        jobs.register(Model)  # its rows fail like every kind's when their worker dies
