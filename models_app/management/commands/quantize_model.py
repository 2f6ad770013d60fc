from mistudio.commands import acting_user, service_call
from models_app import jobs, services

from ._common import ModelCommand


class Command(ModelCommand):
    help = "Make another format of a ready model from its stored snapshot (no new download): a new model record."

    def add_arguments(self, parser):
        parser.add_argument("model_id")
        parser.add_argument("--quantization", required=True, help="FP32, FP16, Q8, Q4 or Q2.")
        self.add_job_arguments(parser)

    def handle(self, *args, **options):
        model = service_call(
            services.request_quantize,
            user=acting_user(options),
            model_id=options["model_id"],
            quantization=options["quantization"],
            enqueue=not options["sync"],
        )
        self.run_job(model, jobs.run_quantize, options)
