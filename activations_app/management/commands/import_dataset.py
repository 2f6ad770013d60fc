import json

from django.core.management.base import BaseCommand

from activations_app import services
from models_app.management.commands._common import service_call


class Command(BaseCommand):
    help = (
        "Add a text dataset: a local .txt/.jsonl/.csv/.parquet file under MISTUDIO_IMPORT_ROOTS, "
        "or a Hub dataset repo id (owner/name) from HF_ENDPOINT."
    )

    def add_arguments(self, parser):
        parser.add_argument("path_or_repo")
        parser.add_argument("--name", default=None)
        parser.add_argument("--text-column", default="text")
        parser.add_argument("--split", default="train", help="For Hub repos: which split's files to take.")
        parser.add_argument("--token-env", metavar="VAR", help="Environment variable holding a Hub token (gated repos).")
        parser.add_argument("--json", action="store_true")

    def handle(self, *args, **options):
        import os

        token = os.environ.get(options["token_env"]) if options["token_env"] else None
        dataset = service_call(
            services.import_dataset, path=options["path_or_repo"], name=options["name"],
            text_column=options["text_column"], split=options["split"], token=token,
        )  # fmt: skip
        if options["json"]:
            self.stdout.write(json.dumps(dataset.as_dict()))
        else:
            self.stdout.write(f"{dataset.id}  {dataset.name}  {dataset.row_count:,} rows")
