import json

from django.core.management.base import BaseCommand

from models_app.models import Model

from ._common import describe


class Command(BaseCommand):
    help = "List models, newest first."

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", help="Print a JSON array of records.")
        parser.add_argument("--status", default=None)

    def handle(self, *args, **options):
        models = Model.objects.all()
        if options["status"]:
            models = models.filter(status=options["status"])
        if options["json"]:
            self.stdout.write(json.dumps([m.as_dict() for m in models]))
            return
        for model in models:
            line = describe(model)
            if model.is_running:
                line += f"  {model.progress:.1f}%"
            if model.error_message:
                line += f"  [{model.error_code}] {model.error_message}"
            self.stdout.write(line)
