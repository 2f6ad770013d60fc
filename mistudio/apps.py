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
        connect_revocation_signals()


def connect_revocation_signals() -> None:
    """Open sockets outlive nothing that HTTP would refuse: deleting an API token, deactivating
    or deleting a user, or changing their password makes each of that user's sockets check
    itself at once (progress.recheck_user_sockets), and the ones no longer signed in close."""
    from django.contrib.auth import get_user_model
    from django.db import transaction
    from django.db.models.signals import post_delete, post_save, pre_save

    from .models import ApiToken
    from .progress import recheck_user_sockets as recheck_now

    def recheck_user_sockets(user_id) -> None:  # once the change is committed: the sockets read it from the database
        transaction.on_commit(lambda: recheck_now(user_id))

    user_model = get_user_model()

    def remember(sender, instance, **kwargs) -> None:
        before = sender.objects.filter(pk=instance.pk).values("password", "is_active").first() if instance.pk else None
        instance._signed_in_as = before

    def user_saved(sender, instance, created, **kwargs) -> None:
        before = getattr(instance, "_signed_in_as", None)
        if before and (before["password"] != instance.password or before["is_active"] != instance.is_active):
            recheck_user_sockets(instance.pk)

    pre_save.connect(remember, sender=user_model, dispatch_uid="mistudio-user-before", weak=False)
    post_save.connect(user_saved, sender=user_model, dispatch_uid="mistudio-user-saved", weak=False)
    post_delete.connect(lambda sender, instance, **kw: recheck_user_sockets(instance.pk), sender=user_model,
                        dispatch_uid="mistudio-user-deleted", weak=False)  # fmt: skip
    post_delete.connect(lambda sender, instance, **kw: recheck_user_sockets(instance.user_id), sender=ApiToken,
                        dispatch_uid="mistudio-token-deleted", weak=False)  # fmt: skip
