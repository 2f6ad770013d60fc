import os

from activations_app import jobs, services
from mistudio.commands import JobCommand, acting_user, service_call, token_from_env


class Command(JobCommand):
    help = (
        "Add a text dataset: a local .txt/.jsonl/.csv/.parquet file under MISTUDIO_IMPORT_ROOTS (ready at once), "
        "or a Hub dataset repo id (owner/name) from HF_ENDPOINT (a download job, like a model's)."
    )
    follow_hint = "; follow it on the Datasets page or GET /api/datasets/<id>"

    def add_arguments(self, parser):
        parser.add_argument("path_or_repo")
        parser.add_argument("--name", default=None)
        parser.add_argument("--text-column", default="text")
        parser.add_argument("--split", default="train", help="For Hub repos: which split's files to take.")
        parser.add_argument("--revision", default=None, help="For Hub repos: branch, tag or commit (default: main).")
        parser.add_argument("--token-env", metavar="VAR", help="Environment variable holding a Hub token (gated repos).")
        parser.add_argument("--config", default=None, help="For Hub repos: the subset (its folder), when there are several.")
        parser.add_argument("--download-whole", action="store_true",
                            help="For Hub repos: keep a local copy instead of streaming the rows an extraction needs.")  # fmt: skip
        self.add_job_arguments(parser)

    def handle(self, *args, **options):
        token = token_from_env(options["token_env"])
        source = options["path_or_repo"]
        if source.startswith(".") or os.path.exists(source):  # at the shell, a relative path is the user's own
            source = os.path.abspath(source)
        dataset = service_call(
            services.import_dataset, path=source, name=options["name"],
            text_column=options["text_column"], split=options["split"], token=token, revision=options["revision"],
            enqueue=not options["sync"], user=acting_user(options), config=options["config"],
            download_whole=options["download_whole"],
        )  # fmt: skip
        if dataset.is_running:
            self.run_job(dataset, jobs.run_dataset_import, options)
        else:  # a local file: already stored
            self.report(dataset, options, finished=True)

    def describe(self, dataset) -> str:
        rows = "uncounted" if dataset.row_count is None else f"{dataset.row_count:,}"
        return f"{dataset.id}  {dataset.name}  {rows} rows{'  (streamed from the Hub)' if dataset.storage == 'stream' else ''}"
