import json

from django.core.management.base import BaseCommand

from mistudio.commands import service_call
from models_app import services
from models_app.ml.fidelity import HOOKS


class Command(BaseCommand):
    help = ("How far model B's activations are from model A's on the shipped text, block by block (cosine per token, "
            "relative error, variance unexplained for the residual stream, attention and MLP outputs) and at the output "
            "(KL divergence, top-1 agreement). Both must be ready and of one architecture and shape.")

    def add_arguments(self, parser):
        parser.add_argument("model_a", help="The reference (e.g. the FP32 model).")
        parser.add_argument("model_b", help="The model compared with it (a quantized format, a fine-tune).")
        parser.add_argument("--tokens", type=int, default=None, help="Use only the text's first N tokens.")
        parser.add_argument("--json", action="store_true")

    def handle(self, *args, **options):
        found = service_call(services.compare_models, options["model_a"], options["model_b"], options["tokens"])
        if options["json"]:
            self.stdout.write(json.dumps(found))
            return
        self.stdout.write(f"{found['b_label']} against {found['a_label']}: {found['tokens']:,} tokens of the shipped text "
                          "(position 0 of each window and BOS tokens left out; compared at float16 resolution)")
        self.stdout.write(f"{'layer':>5}  " + "  ".join(f"{hook + ' cos':>14} {'rel err':>8} {'FVU':>8}" for hook in HOOKS))
        for row in found["layers"]:
            cells = "  ".join(f"{row[h]['cosine']:>14.5f} {row[h]['rel_error']:>8.4f} {row[h]['fvu']:>8.4f}" for h in HOOKS)
            self.stdout.write(f"{row['layer']:>5}  {cells}")
        out = found["output"]
        self.stdout.write(f"output: KL {out['kl']:.4g} nats/token, top-1 agreement {100 * out['top1']:.1f} %, "
                          f"perplexity {found['perplexity']:.3f} (A: {found['reference_perplexity']:.3f})")
