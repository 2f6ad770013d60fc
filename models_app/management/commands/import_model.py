import os

from mistudio.commands import acting_user, service_call
from models_app import jobs, services

from ._common import ModelCommand


class Command(ModelCommand):
    help = (
        "Import a local model: a folder with config.json + safetensors, or a single .gguf file "
        "(dequantized to FP32 through transformers). Only paths under MISTUDIO_IMPORT_ROOTS are read."
    )

    def add_arguments(self, parser):
        parser.add_argument("path")
        parser.add_argument("--name", default=None)
        self.add_job_arguments(parser)

    def handle(self, *args, **options):
        model = service_call(
            services.request_import, user=acting_user(options), path=os.path.abspath(options["path"]) if options["path"] else "", name=options["name"], enqueue=not options["sync"]
        )
        self.run_job(model, jobs.run_import, options)
