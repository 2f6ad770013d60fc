import sys

from django.core.management.base import BaseCommand

from activations_app import jobs, services
from activations_app.ml.export import FORMATS
from mistudio.commands import service_call


class Command(BaseCommand):
    help = ("Write a completed extraction in a trainer's format: SAELens (one Hugging Face `datasets` dataset per "
            "layer/hook, loadable as cached_activations_path), into extraction_{id}/saelens/ or --out DIR.")  # fmt: skip

    def add_arguments(self, parser):
        parser.add_argument("extraction_id")
        parser.add_argument("--format", choices=FORMATS, default="saelens")
        parser.add_argument("--out", help="folder to write (default: the extraction's own saelens/ folder)")

    def handle(self, *args, **options):
        from pathlib import Path

        service_call(services.export_extraction, options["extraction_id"], None, options["format"], enqueue=False)

        def progress(done: int, total: int) -> None:
            sys.stderr.write(f"\rexporting [{'#' * int(30 * done / total):<30}] {100 * done / total:5.1f}%  {done}/{total} rows")
            sys.stderr.flush()

        out = Path(options["out"]).resolve() if options["out"] else None
        paths = jobs.run_export(options["extraction_id"], options["format"], out, progress)
        sys.stderr.write("\n")
        for path in paths:
            self.stdout.write(str(path))
