import json

from django.core.management.base import CommandError

from activations_app import jobs, services
from activations_app.forms import ExtractionForm
from activations_app.models import ExtractionStatus
from mistudio.commands import JobCommand, acting_user, eta_text, service_call
from models_app.services import get_model


def int_list(value: str) -> list:
    try:
        return [int(part) for part in value.split(",") if part.strip() != ""]
    except ValueError:
        raise CommandError(f"--layers must be comma-separated integers, not {value!r}.") from None


class Command(JobCommand):
    help = "Extract activations of a ready model over a dataset into activations/extraction_{id}/."
    follow_hint = "; follow it on the Extractions page or GET /api/extractions/<id>"

    def add_arguments(self, parser):
        parser.add_argument("model_id", nargs="?")
        parser.add_argument("--dataset")
        parser.add_argument("--layers", help="e.g. 0,5,11")
        parser.add_argument("--hooks", help="residual,mlp,attention")
        parser.add_argument("--template", metavar="NAME_OR_ID",
                            help="start from a saved extraction template (options given here override it)")  # fmt: skip
        parser.add_argument("--save-template", metavar="NAME",
                            help="save these layers, hooks and settings as a template (no dataset, nothing runs)")  # fmt: skip
        parser.add_argument("--resume", metavar="EXT_ID",
                            help="go on with a stopped extraction from its last durable batch (no other arguments)")  # fmt: skip
        # The dialog's settings, with its defaults and the same validation (ExtractionForm).
        for name in ExtractionForm.SETTINGS:
            field = ExtractionForm.base_fields[name]
            choices = [value for value, _ in field.choices] if hasattr(field, "choices") else None
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name, choices=choices, help=field.label)
        self.add_job_arguments(parser)

    def handle(self, *args, **options):
        if options["resume"]:
            extraction = service_call(services.resume_extraction, options["resume"], acting_user(options),
                                      enqueue=not options["sync"])  # fmt: skip
            self.run_job(extraction, jobs.run_extraction_job, options)
            return
        user = acting_user(options)
        data = {}
        if options["template"]:
            template = service_call(services.get_template, options["template"], user)
            data, dropped = services.template_for_model(template, service_call(get_model, options["model_id"] or ""))
            if dropped:
                self.stderr.write(f"Layers {dropped} of template {template.name!r} are beyond this model and were left out.")
        data |= {name: options[name] for name in ExtractionForm.SETTINGS if options[name] is not None}
        if options["layers"] is not None:
            data["layers"] = int_list(options["layers"])
        if options["hooks"] is not None:
            data["hook_types"] = [h for h in options["hooks"].split(",") if h]
        if options["save_template"] is not None:
            if not options["model_id"] or "layers" not in data or "hook_types" not in data:
                raise CommandError("Give MODEL_ID, --layers and --hooks (or --template) to save a template.")
            template = service_call(services.save_template, model_id=options["model_id"], name=options["save_template"],
                                    data=data, user=user)  # fmt: skip
            self.stdout.write(json.dumps(template.as_dict()) if options.get("json") else f"{template.id}  {template.name}  saved")
            return
        if not options["model_id"] or options["dataset"] is None or "layers" not in data or "hook_types" not in data:
            raise CommandError("Give MODEL_ID, --dataset, --layers and --hooks (or --template NAME, or --resume EXT_ID).")
        extraction = service_call(
            services.request_extraction, model_id=options["model_id"], dataset_id=options["dataset"],
            enqueue=not options["sync"], data=data, user=user,
        )  # fmt: skip
        self.run_job(extraction, jobs.run_extraction_job, options)

    def describe(self, extraction) -> str:
        return f"{extraction.id}  {extraction.status}  {extraction.output_path or ''}"

    def progress_detail(self, extraction) -> str:
        if extraction.status != ExtractionStatus.EXTRACTING or not extraction.samples_total:
            return ""
        return (f"{extraction.samples_done}/{extraction.samples_total} samples  "
                f"{extraction.samples_per_second:.1f} samples/s  ETA {eta_text(extraction.eta_seconds)}")  # fmt: skip
