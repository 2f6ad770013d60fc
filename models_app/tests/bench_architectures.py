"""The family sweep: every model type in transformers' causal-LM auto-mapping, built tiny
and random from its default config, must end exact (both identities, measured with the
hooks extraction uses) or refused from its config with a reason: never a crash, never
wrong tensors passed as right. Prints the counts and every refusal's reason."""

import collections
import signal
import time

import pytest

from mistudio.errors import JobError
from models_app.ml import decoder, loading

PER_TYPE_SECONDS = 60


class TookTooLong(Exception):
    pass


def _alarm(*_):
    raise TookTooLong(f"took over {PER_TYPE_SECONDS} s at toy size")


def sweep() -> dict[str, list[tuple[str, str]]]:
    signal.signal(signal.SIGALRM, _alarm)
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    outcome = collections.defaultdict(list)
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            config = AutoConfig.for_model(model_type).to_dict()
        except Exception as exc:  # noqa: BLE001 - a config class that needs arguments
            outcome["not buildable tiny"].append((model_type, f"default config: {type(exc).__name__}: {exc}"[:160]))
            continue
        config["model_type"] = model_type
        signal.alarm(PER_TYPE_SECONDS)  # a toy model that takes longer says nothing about the family
        try:
            loading.check_family(config)  # encoder-decoder, encoder-only: refused from the config alone
            verdict = decoder.judge_config(config)
        except JobError as exc:
            outcome["refused"].append((model_type, exc.message))
            continue
        except (decoder.NotBuildable, TookTooLong) as exc:
            outcome["not buildable tiny"].append((model_type, str(exc)[:160] or "took too long at toy size"))
            continue
        finally:
            signal.alarm(0)
        outcome["exact"].append((model_type, "parallel" if verdict.layout.parallel else "sequential"))
    return outcome


@pytest.mark.timeout(1800)
def test_every_causal_lm_family_is_exact_or_refused_from_its_config():
    started = time.perf_counter()
    outcome = sweep()
    total = sum(len(v) for v in outcome.values())
    print(f"\nfamily sweep over {total} causal-LM model types ({time.perf_counter() - started:.0f} s):")
    for kind in ("exact", "refused", "not buildable tiny"):
        print(f"  {kind:20s} {len(outcome[kind]):4d}")
    for kind in ("refused", "not buildable tiny"):
        for model_type, why in outcome[kind]:
            print(f"  {kind}: {model_type}: {why}")
    print("  exact: " + ", ".join(m for m, _ in outcome["exact"]))
    assert total == len(__import__("transformers").models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
