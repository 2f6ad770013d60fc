import json

from django.core.management.base import BaseCommand, CommandError

from mistudio.commands import acting_user, add_user_argument, service_call
from models_app import jobs, services


class Command(BaseCommand):
    help = ("Re-read a ready model's raw snapshot and compare every file with the SHA-256 it had when it arrived "
            "(the Hub's own, checked then). Exits non-zero when a file changed or is missing.")

    def add_arguments(self, parser):
        parser.add_argument("model_id")
        parser.add_argument("--json", action="store_true")
        add_user_argument(parser)

    def handle(self, *args, **options):
        model = service_call(services.request_verify, options["model_id"], acting_user(options), enqueue=False)
        model = jobs.verify_model(model.id)
        outcome = model.verification
        if options["json"]:
            self.stdout.write(json.dumps({"id": model.id, **outcome}))
        elif outcome["state"] == "ok":
            self.stdout.write(f"{model.id}: all {outcome['checked']} files of {model.raw_dir} match their SHA-256.")
        if outcome["state"] != "ok":
            raise CommandError(f"[{outcome['state']}] " + " ".join(outcome["problems"]))
