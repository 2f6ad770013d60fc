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
        parser.add_argument("--out", help="a new or empty folder to write, outside the extraction's folder "
                                          "(default: the extraction's own saelens/ folder)")

    def handle(self, *args, **options):
        from pathlib import Path

        out = Path(options["out"]).resolve() if options["out"] else None
        service_call(services.export_extraction, options["extraction_id"], None, options["format"], enqueue=False, out=out)

        def progress(done: int, total: int) -> None:
            sys.stderr.write(f"\rexporting [{'#' * int(30 * done / total):<30}] {100 * done / total:5.1f}%  {done}/{total} rows")
            sys.stderr.flush()

        paths = service_call(jobs.run_export, options["extraction_id"], options["format"], out, progress)
        sys.stderr.write("\n")
        for path in paths:
            self.stdout.write(str(path))
