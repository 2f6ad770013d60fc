import json

from django.core.management.base import BaseCommand

from activations_app import services
from models_app.management.commands._common import service_call


class Command(BaseCommand):
    help = "Add a text dataset from a local .txt/.jsonl/.csv/.parquet file under MISTUDIO_IMPORT_ROOTS."

    def add_arguments(self, parser):
        parser.add_argument("path")
        parser.add_argument("--name", default=None)
        parser.add_argument("--text-column", default="text")
        parser.add_argument("--json", action="store_true")

    def handle(self, *args, **options):
        dataset = service_call(
            services.import_dataset, path=options["path"], name=options["name"], text_column=options["text_column"]
        )
        if options["json"]:
            self.stdout.write(json.dumps(dataset.as_dict()))
        else:
            self.stdout.write(f"{dataset.id}  {dataset.name}  {dataset.row_count:,} rows")
