from mistudio.commands import acting_user, service_call, token_from_env
from models_app import jobs, services

from ._common import ModelCommand


class Command(ModelCommand):
    help = "Download a model from the Hugging Face Hub (HF_ENDPOINT) into the data dir."

    def add_arguments(self, parser):
        parser.add_argument("repo_id", help="owner/name, e.g. HuggingFaceTB/SmolLM2-135M")
        parser.add_argument("--quantization", default="FP32", help="FP32 (default) or FP16.")
        parser.add_argument("--revision", default=None, help="Branch, tag or commit (default: main).")
        parser.add_argument(
            "--token-env",
            metavar="VAR",
            help="Name of an environment variable holding the Hub token (the token itself is never an argument).",
        )
        parser.add_argument("--allow-duplicate", action="store_true",
                            help="Download again when the same repo, revision and format is already here.")  # fmt: skip
        self.add_job_arguments(parser)

    def handle(self, *args, **options):
        token = token_from_env(options["token_env"])
        model = service_call(
            services.request_download,
            user=acting_user(options),
            repo_id=options["repo_id"],
            quantization=options["quantization"],
            token=token,
            revision=options["revision"],
            enqueue=not options["sync"],
            allow_duplicate=options["allow_duplicate"],
        )
        self.run_job(model, jobs.run_download, options)
