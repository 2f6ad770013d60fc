import json
import sys

from django.core.management.base import BaseCommand, CommandError

from activations_app import jobs, services
from activations_app.models import ExtractionStatus
from models_app.management.commands._common import TerminalProgress, eta_text, service_call


def int_list(value: str) -> list:
    try:
        return [int(part) for part in value.split(",") if part.strip() != ""]
    except ValueError:
        raise CommandError(f"--layers must be comma-separated integers, not {value!r}.") from None


class Command(BaseCommand):
    help = "Extract activations of a ready model over a dataset into activations/extraction_{id}/."

    def add_arguments(self, parser):
        parser.add_argument("model_id")
        parser.add_argument("--dataset", required=True)
        parser.add_argument("--layers", required=True, help="e.g. 0,5,11")
        parser.add_argument("--hooks", required=True, help="residual,mlp,attention")
        parser.add_argument("--max-samples", default="1000")
        parser.add_argument("--batch-size", default="32")
        parser.add_argument("--seq-len", default="128")
        parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
        parser.add_argument("--tokenization", default="packed", choices=["packed", "truncate"])
        parser.add_argument("--sync", action="store_true")
        parser.add_argument("--json", action="store_true")

    def handle(self, *args, **options):
        extraction = service_call(
            services.request_extraction,
            model_id=options["model_id"], dataset_id=options["dataset"], enqueue=not options["sync"],
            layers=int_list(options["layers"]), hook_types=[h for h in options["hooks"].split(",") if h],
            max_samples=options["max_samples"], batch_size=options["batch_size"], seq_len=options["seq_len"],
            dtype=options["dtype"], tokenization=options["tokenization"],
        )  # fmt: skip
        if options["sync"]:
            bar = TerminalProgress(detail=samples_detail)
            try:
                jobs.run_extraction_job(extraction.id, listener=bar)
            except Exception:  # noqa: BLE001 - the row records it; reported below
                pass
            finally:
                bar.close()
            extraction.refresh_from_db()
        if options["json"]:
            self.stdout.write(json.dumps(extraction.as_dict()))
        else:
            self.stdout.write(f"{extraction.id}  {extraction.status}  {extraction.output_path or ''}")
        sys.stdout.flush()
        if extraction.status == ExtractionStatus.FAILED:
            raise CommandError(f"{extraction.id} failed [{extraction.error_code}]: {extraction.error_message}")
        if options["sync"] and extraction.status != ExtractionStatus.COMPLETED:
            raise CommandError(f"{extraction.id} ended {extraction.status}; no files were kept.")


def samples_detail(extraction) -> str:
    if extraction.status != ExtractionStatus.EXTRACTING or not extraction.samples_total:
        return ""
    return (f"{extraction.samples_done}/{extraction.samples_total} samples  "
            f"{extraction.samples_per_second:.1f} samples/s  ETA {eta_text(extraction.eta_seconds)}")  # fmt: skip
