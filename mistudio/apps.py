from django.apps import AppConfig


class MistudioConfig(AppConfig):
    name = "mistudio"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.contrib.auth.signals import user_logged_out

        from .progress import close_session_sockets

        def close_sockets(sender, request, **kwargs) -> None:
            if request is not None and request.session.session_key:
                close_session_sockets(request.session.session_key)

        user_logged_out.connect(close_sockets, dispatch_uid="mistudio-close-session-sockets", weak=False)
