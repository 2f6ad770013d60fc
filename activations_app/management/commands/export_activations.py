from pathlib import Path

from activations_app import jobs, services
from activations_app.ml.export import FORMATS, NAMING_REASON, NAMINGS
from activations_app.models import ExportStatus
from mistudio.commands import JobCommand, acting_user, service_call


class Command(JobCommand):
    help = ("Write a completed extraction in a trainer's format: SAELens (one Hugging Face `datasets` dataset per "
            "layer/hook, loadable as cached_activations_path), into extraction_{id}/saelens/ or --out DIR. Runs here "
            "with a progress bar; --queue hands it to a worker. Either way it is a tracked export (GET /api/exports/<id>).")  # fmt: skip
    follow_hint = "; follow it on the extraction's page or GET /api/exports/<id>"

    def add_arguments(self, parser):
        parser.add_argument("extraction_id")
        parser.add_argument("--format", choices=FORMATS, default="saelens")
        parser.add_argument("--out", help="a new or empty folder to write, outside the extraction's folder "
                                          "(default: the extraction's own saelens/ folder)")  # fmt: skip
        parser.add_argument("--naming", choices=NAMINGS, default=None,
                            help="hook names in the export (default: tl for a model TransformerLens loads by name, "
                                 f"else {NAMING_REASON})")  # fmt: skip
        parser.add_argument("--shuffle", metavar="SEED", default=None,
                            help="permute the rows across the whole export with this seed (0 to 2^32 - 1; the same "
                                 "permutation for every hook and the tokens; row_order.npy maps them back); default: "
                                 "text order")  # fmt: skip
        parser.add_argument("--queue", action="store_true", help="Queue it for a worker instead of running it here.")
        self.add_job_arguments(parser)

    def handle(self, *args, **options):
        out = Path(options["out"]).resolve() if options["out"] else None
        options["sync"] = not options["queue"]  # this command runs here unless told otherwise
        if options["naming"] is None:
            self.stderr.write(f"Hook names: {service_call(services.default_export_naming, options['extraction_id'])[1]}.")
        export = service_call(services.export_extraction, options["extraction_id"], acting_user(options), options["format"],
                              enqueue=options["queue"], out=out, naming=options["naming"], shuffle=options["shuffle"])  # fmt: skip
        export = self.run_job(export, jobs.run_export_job, options)
        if export.saelens_snippet:  # on stderr: stdout stays the paths (or the JSON)
            self.stderr.write("SAELens, from this export (export.json has every hook):\n" + export.saelens_snippet)

    def progress_detail(self, export) -> str:
        if export.status != ExportStatus.EXPORTING or not export.rows_total:
            return ""
        return f"{export.rows_done}/{export.rows_total} rows"

    def describe(self, export) -> str:
        """The datasets written, one path a line (what scripts read)."""
        return "\n".join(export.paths) if export.is_ready else f"{export.id}  {export.status}"
