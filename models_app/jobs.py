"""RQ jobs: an id in, the row loaded, pure `ml` code called with a progress callback, the
outcome recorded. Also run inline by the management commands' --sync."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from django.conf import settings

from mistudio.errors import JobCancelled, JobError
from mistudio.hub import ensure_free_space, read_sums, verify_folder, write_sums
from mistudio.hub_access import retry_policy, stored_token
from mistudio.jobs import Listener, TrackedJob, run_tracked
from mistudio.staging import promote, staged_dir, staged_path
from mistudio.validation import inside_roots

from .ml import fidelity, hub, loading, quality, quantize
from .ml.gguf_import import gguf_to_safetensors
from .models import Model, ModelStatus

log = logging.getLogger(__name__)


def _finish(model: Model, job: TrackedJob, requested: str) -> None:
    """Loading (config, architecture, exact parameters), then quantizing when the format to
    make is not the FP32 snapshot itself, then the figures a user compares formats by."""
    job.phase(ModelStatus.LOADING, progress=100.0)
    facts = loading.inspect_model(model.raw_dir)
    device = quantize.compute_device()
    estimates = quantize.memory_estimate(facts.config, device)
    job.write(
        architecture=facts.architecture,
        params_count=facts.params_count,
        architecture_config=facts.config,
        file_path=str(model.raw_dir),
    )
    budget = quantize.memory_budget(settings.GPU_MEMORY_LIMIT, device)
    fmt, notes = quantize.choose_format(requested, estimates, budget, device)
    figures: dict = {}
    downloaded: dict = {}
    if fmt != "FP32":
        # The byte counters follow the quantization while it streams; the download's are put back at the end.
        downloaded = Model.objects.values("bytes_done", "bytes_total").get(pk=model.pk)
        job.phase(ModelStatus.QUANTIZING, progress=0.0, bytes_done=0, bytes_total=0)
        tokenizer = _tokenizer(model)
        # The FP32 reference first (its activations and outputs to disk, then freed): one
        # model in memory at a time, and every format made from the snapshot compares with it.
        reference = _reference(model, tokenizer, estimates, device, _moving(job, 0.0, REFERENCE_END))
        job.write(progress=REFERENCE_END)
        # Checked before quantizing, not found by a full disk half way through the shards.
        ensure_free_space(model.quantized_dir(fmt).parent, quantize.estimate_weight_bytes(facts.config, fmt, device),
                          settings.DISK_RESERVE_BYTES, what=f"the {fmt} model")  # fmt: skip
        loaded, result = quantize.quantize_snapshot(
            model.raw_dir, requested, model.quantized_dir, estimates, budget, device, on_bytes=_streaming(job),
        )  # fmt: skip
        job.flush()
        # Measuring next: no bytes beside the bar.
        job.write(progress=QUANTIZED_END, bytes_done=0, bytes_total=0, eta_seconds=None)
        fmt, notes = result.produced, result.notes
        target = model.quantized_dir(fmt)
        log.info(
            "model %s %s%s: measured %d bytes, estimated %d (weights), error %+.1f%%",
            model.id, fmt, " (streamed from the shards)" if result.streamed else "", result.footprint_bytes, estimates[fmt] / 1.2,
            100 * (result.footprint_bytes - estimates[fmt] / 1.2) / (estimates[fmt] / 1.2),
        )  # fmt: skip
        figures = {
            "quantized_path": str(target),
            "memory_measured_bytes": result.footprint_bytes,
            "peak_cuda_bytes": result.peak_cuda_bytes,
        }
        figures |= _measure(model, loaded, tokenizer, reference, _moving(job, QUANTIZED_END, 99.0))
        del loaded
        quantize.free_accelerator_memory()
    disk = loading.folder_size(Path(figures["quantized_path"]) if figures else model.raw_dir)
    job.write(
        status=ModelStatus.READY,
        progress=100.0,
        quantization=fmt,
        format_notes="\n".join(notes),
        memory_required_bytes=estimates[fmt],
        disk_size_bytes=disk,
        encrypted_token=None,
        speed_bps=0,
        eta_seconds=None,
        **figures,
        **downloaded,
    )


# Perplexity and fidelity on the reference text are figures, not the product: when they
# cannot be computed (no tokenizer, no memory for the FP32 reference, an error in the forward
# pass) the model is still ready, without them, and the worker log says why.

REFERENCE_END = 15.0  # % of the quantizing phase: the FP32 reference's pass (QUANTIZING_STEPS)
QUANTIZED_END = 60.0  # then the quantization (by bytes where it streams), then the measuring


def _streaming(job: TrackedJob):
    """A streamed quantization's bytes as the phase's progress; once the new format is on disk,
    a cancel is looked for at once (written, not throttled), before the model is reloaded."""

    def on_bytes(done: int, total: int) -> None:
        job.transfer(done, total, REFERENCE_END, QUANTIZED_END)
        if done >= total:
            job.flush()
            job.write(progress=QUANTIZED_END)

    return on_bytes


def _tokenizer(model: Model):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model.raw_dir)
    except (OSError, ValueError):
        log.info("model %s has no tokenizer: no perplexity figure", model.id)
        return None


def _moving(job: TrackedJob, start: float, end: float):
    """A pass's window-by-window progress as the phase's, from `start` to `end` %
    (QUANTIZING_STEPS names the step by where it is)."""
    return lambda done, total: job.report(start + (end - start) * done / total, lambda: {}, force=done >= total)


def _reference(model: Model, tokenizer, estimates: dict[str, int], device: str, on_window=None) -> dict | None:
    """The snapshot's FP32 reference on the shipped text (fidelity.record), recorded once per
    snapshot and shared by every format made from it: what it wrote, or None when there is
    no tokenizer or FP32 does not fit in memory now."""
    if tokenizer is None:
        return None
    window, limit = fidelity.WINDOW_TOKENS, settings.PERPLEXITY_MAX_TOKENS
    known = fidelity.recorded(model.reference_dir, limit, window)
    if known is not None:
        return known
    if estimates["FP32"] > quantize.memory_budget(settings.GPU_MEMORY_LIMIT, device):
        log.info("model %s: FP32 does not fit now; no reference, so no fidelity or baseline perplexity", model.id)
        return None
    try:
        baseline = quantize.load_in_format(model.raw_dir, "FP32", device)
        with staged_dir(model.reference_dir) as tmp:
            info = fidelity.record(baseline, tokenizer, tmp, limit, window, on_window)
    except JobCancelled:
        raise
    except Exception:  # noqa: BLE001 - logged; the model is made without fidelity figures
        log.exception("model %s: the FP32 reference could not be recorded; no fidelity figures", model.id)
        return None
    finally:
        baseline = None
        quantize.free_accelerator_memory()
    return info


def _measure(model: Model, loaded, tokenizer, reference: dict | None, on_window=None) -> dict:
    """The new format's perplexity and, against the FP32 reference, its fidelity by layer
    (one pass over the shipped text); the baseline perplexity from the reference."""
    if tokenizer is None:
        return {}
    limit = settings.PERPLEXITY_MAX_TOKENS
    if reference is not None:
        try:
            found = fidelity.compare(loaded, tokenizer, model.reference_dir, limit, fidelity.WINDOW_TOKENS, on_window)
        except JobCancelled:  # seen by the progress report between windows: the job stops
            raise
        except Exception:  # noqa: BLE001 - logged; the perplexity alone is tried below
            log.exception("model %s: no fidelity figures; measuring its perplexity alone", model.id)
        else:
            return {"perplexity": found.pop("perplexity"), "perplexity_baseline": found.pop("reference_perplexity"),
                    "fidelity": {**found, "reference": "FP32", "reference_of": model.snapshot_owner, **fidelity_terms()}}  # fmt: skip
    try:
        figures = {"perplexity": quality.perplexity(loaded, tokenizer, max_tokens=limit, on_window=on_window)}
    except JobCancelled:
        raise
    except Exception:  # noqa: BLE001 - logged; the model itself is good
        log.exception("model %s: no perplexity figure; the model is ready without it", model.id)
        return {}
    baseline = reference["perplexity"] if reference is not None else model.known_baseline()
    return figures | ({"perplexity_baseline": baseline} if baseline is not None else {})


def fidelity_terms() -> dict:
    """What a fidelity table was measured on, said with it."""
    return {"text": quality.REFERENCE_TEXT.name, "window": fidelity.WINDOW_TOKENS,
            "excluded": "position 0 of each window and BOS tokens", "resolution": "float16 (both sides rounded alike)"}  # fmt: skip


def _download(model: Model, job: TrackedJob) -> None:
    token = stored_token(model.encrypted_token)
    endpoint = settings.HF_ENDPOINT
    retry = retry_policy()
    job.phase(ModelStatus.DOWNLOADING, progress=0.0)
    # A retry fetches the commit the first attempt resolved: its bytes on disk are that commit's.
    plan = hub.plan_download(model.repo_id, model.revision or model.requested_revision, token, endpoint, **retry)
    job.write(revision=plan.sha, bytes_total=plan.total_bytes)
    if _made_from_shared_snapshot(model, plan.sha, job):
        return
    # Written aside and moved into place when complete. Kept when the job fails (a dead
    # worker, a dropped connection): a retry resumes from its bytes (the Hub client's
    # .incomplete files and HTTP Range). A cancel or a delete removes it.
    tmp = staged_path(model.raw_dir)
    # config.json first: an unsupported architecture is refused before gigabytes move.
    hub.fetch_file(plan, "config.json", tmp, token, endpoint)
    config = loading.read_config(tmp)
    loading.check_architecture(config)
    # So is a model that fits the memory budget in no format, before its weights are fetched.
    device = quantize.compute_device()
    budget = quantize.memory_budget(settings.GPU_MEMORY_LIMIT, device)
    quantize.choose_format(model.requested_quantization, quantize.memory_estimate(config, device), budget, device)
    ensure_free_space(tmp, plan.total_bytes, settings.DISK_RESERVE_BYTES)
    hub.download_snapshot(plan, tmp, token, endpoint, job.transfer, **retry)
    del token
    promote(tmp, model.raw_dir)
    _finish(model, job, model.requested_quantization)


def _made_from_shared_snapshot(model: Model, sha: str, job: TrackedJob) -> bool:
    """Another format of this repo at this commit is here: this one is made from its raw
    snapshot (no weight fetched, the folder shared, removed with its last user) and its
    card joins that snapshot's. False when there is none to share."""
    shared = model.shared_snapshot_for(sha)
    if shared is None:
        return False
    job.write(snapshot_of=shared.snapshot_owner, bytes_total=0,
              notice=f"Made from the snapshot already downloaded for {shared.label}: no weights fetched again.")  # fmt: skip
    model.refresh_from_db()
    if not (model.raw_dir / "config.json").is_file():  # its last user was deleted meanwhile: download after all
        job.write(snapshot_of="", notice="")
        model.refresh_from_db()
        return False
    log.info("model %s: made from the snapshot of %s (%s@%s); no weights fetched", model.id, model.snapshot_owner, model.repo_id, sha)
    model.publish_moved()
    _finish(model, job, model.requested_quantization)
    return True


def _import(model: Model, job: TrackedJob) -> None:
    source = Path(model.source_path)
    job.phase(ModelStatus.LOADING, progress=0.0)
    if model.source == "gguf":
        gguf_to_safetensors(source, model.raw_dir)
    else:
        _copy_model_folder(source, model.raw_dir, job)
    _finish(model, job, model.requested_quantization)


def _copy_model_folder(src: Path, dest: Path, job: TrackedJob) -> None:
    files = [p for p in sorted(src.iterdir()) if p.is_file() and (p.suffix == ".safetensors" or p.name in loading.SIDECAR_FILES or p.name == "model.safetensors.index.json")]
    # Checked again when copied: a link may have been put there since the request.
    escaping = [p.name for p in files if not inside_roots(p.resolve(), settings.IMPORT_ROOTS)]
    if escaping:
        raise JobError("path_not_allowed", f"{', '.join(escaping)} link outside the allowed import folders; "
                                           "copy the files in instead of linking them.")  # fmt: skip
    total = sum(p.stat().st_size for p in files)
    ensure_free_space(dest.parent, total, settings.DISK_RESERVE_BYTES)
    done, sums = 0, {}
    with staged_dir(dest) as tmp:
        for path in files:
            hasher = hashlib.sha256()
            with path.open("rb") as reader, (tmp / path.name).open("wb") as writer:
                while chunk := reader.read(8 << 20):
                    writer.write(chunk)
                    hasher.update(chunk)
                    done += len(chunk)
                    job.transfer(done, total)
            sums[path.name] = hasher.hexdigest()
        write_sums(tmp, sums)  # what was copied, so verify_model sees a later change


def run_download(model_id: str, listener: Listener | None = None) -> Model | None:
    return run_tracked(Model, model_id, _download, listener)


def run_import(model_id: str, listener: Listener | None = None) -> Model | None:
    return run_tracked(Model, model_id, _import, listener)


def run_quantize(model_id: str, listener: Listener | None = None) -> Model | None:
    return run_tracked(Model, model_id, lambda model, job: _finish(model, job, model.requested_quantization), listener)


def download_model_job(model_id: str) -> None:
    run_download(model_id)


def quantize_model_job(model_id: str) -> None:
    run_quantize(model_id)


def import_model_job(model_id: str) -> None:
    run_import(model_id)


def verify_model(model_id: str) -> Model:
    """Re-hash the model's raw snapshot against its SHA256SUMS (written as the files arrived,
    each checked against the Hub's hash then) and record the outcome on the row."""
    from django.utils import timezone

    model = Model.objects.get(pk=model_id)
    sums = read_sums(model.raw_dir)
    if not sums:
        outcome = {"state": "unchecked", "problems": [
            f"{model.raw_dir.name} has no SHA256SUMS: it was downloaded before checksums were kept, or imported "
            "from a GGUF file. Download it again to have it checked."]}  # fmt: skip
    else:
        try:
            good, problems = verify_folder(model.raw_dir)
        except OSError as exc:
            good, problems = [], [f"The snapshot could not be read: {exc.strerror or type(exc).__name__}."]
        outcome = {"state": "failed" if problems else "ok", "checked": len(good), "files": len(sums), "problems": problems}
    outcome["at"] = timezone.now().isoformat()
    Model.objects.filter(pk=model_id).update(verification=outcome)
    model.refresh_from_db()
    model.publish()
    log.info("model %s verified: %s (%d problems)", model_id, outcome["state"], len(outcome["problems"]))
    return model


def verify_model_job(model_id: str) -> None:
    try:
        verify_model(model_id)
    except Model.DoesNotExist:  # deleted while queued: nothing to check
        pass
