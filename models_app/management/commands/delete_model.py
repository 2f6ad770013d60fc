import json

from django.core.management.base import BaseCommand

from mistudio.commands import acting_user, add_user_argument, service_call
from models_app import services


class Command(BaseCommand):
    help = "Delete a model record and every file of it. Deleting a missing id is harmless."

    def add_arguments(self, parser):
        parser.add_argument("model_id")
        parser.add_argument("--json", action="store_true")
        add_user_argument(parser)

    def handle(self, *args, **options):
        deleted = service_call(services.delete_model, options["model_id"], acting_user(options))
        if options["json"]:
            self.stdout.write(json.dumps({"id": options["model_id"], "deleted": deleted}))
        else:
            self.stdout.write(f"Deleted {options['model_id']}." if deleted else f"No model {options['model_id']}; nothing to do.")
