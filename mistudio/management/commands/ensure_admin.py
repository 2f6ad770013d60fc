import os
import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "On first run, create the admin account and print its password once."

    def handle(self, *args, **options):
        users = get_user_model()
        if users.objects.filter(is_superuser=True).exists():
            return
        password = os.environ.get("MISTUDIO_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        users.objects.create_superuser("admin", "", password)
        if os.environ.get("MISTUDIO_ADMIN_PASSWORD"):
            self.stdout.write("Created user 'admin' with the password from MISTUDIO_ADMIN_PASSWORD.")
        else:
            self.stdout.write(f"Created user 'admin' with password: {password}  (shown once; change it in /admin/)")
