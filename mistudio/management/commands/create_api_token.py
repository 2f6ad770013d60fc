from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from mistudio.models import ApiToken


class Command(BaseCommand):
    help = "Issue an API token for a user (for `Authorization: Bearer …`). It is shown once."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", default="default")

    def handle(self, *args, **options):
        user = get_user_model().objects.filter(username=options["username"]).first()
        if user is None:
            raise CommandError(f"No user {options['username']!r}.")
        _, raw = ApiToken.issue(user, options["name"])
        self.stdout.write(raw)
