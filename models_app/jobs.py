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

from .ml import hub, loading, quality, quantize
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
    if fmt != "FP32":
        job.phase(ModelStatus.QUANTIZING, progress=0.0)
        loaded, result = quantize.quantize_snapshot(model.raw_dir, requested, model.quantized_dir, estimates, budget, device)
        fmt, notes = result.produced, result.notes
        target = model.quantized_dir(fmt)
        log.info(
            "model %s %s: measured %d bytes, estimated %d (weights), error %+.1f%%",
            model.id, fmt, result.footprint_bytes, estimates[fmt] / 1.2,
            100 * (result.footprint_bytes - estimates[fmt] / 1.2) / (estimates[fmt] / 1.2),
        )  # fmt: skip
        job.write(progress=60.0)
        figures = {
            "quantized_path": str(target),
            "memory_measured_bytes": result.footprint_bytes,
            "peak_cuda_bytes": result.peak_cuda_bytes,
        }
        tokenizer = _tokenizer(model)
        figures |= _perplexity(model, loaded, tokenizer, "perplexity", _moving(job, 60.0, 80.0))
        del loaded  # the FP32 baseline may need the memory
        quantize.free_accelerator_memory()
        job.write(progress=80.0)
        figures |= _baseline_perplexity(model, tokenizer, estimates, device, _moving(job, 80.0, 99.0))
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
    )


# Perplexity on the reference text is a figure, not the product: when it cannot be computed
# (no tokenizer, no memory left for the FP32 baseline, an error in the forward pass) the
# model is still ready, without it, and the worker log says why.


def _tokenizer(model: Model):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model.raw_dir)
    except (OSError, ValueError):
        log.info("model %s has no tokenizer: no perplexity figure", model.id)
        return None


def _moving(job: TrackedJob, start: float, end: float):
    """A perplexity pass's window-by-window progress as the phase's, from `start` to `end` %
    (QUANTIZING_STEPS names the step by where it is)."""
    return lambda done, total: job.report(start + (end - start) * done / total, lambda: {}, force=done >= total)


def _perplexity(model: Model, loaded, tokenizer, field: str, on_window=None) -> dict:
    if tokenizer is None:
        return {}
    try:
        return {field: quality.perplexity(loaded, tokenizer, max_tokens=settings.PERPLEXITY_MAX_TOKENS, on_window=on_window)}
    except JobCancelled:  # seen by the progress report between windows: the job stops
        raise
    except Exception:  # noqa: BLE001 - logged; the model itself is good
        log.exception("model %s: no %s figure; the model is ready without it", model.id, field)
        return {}


def _baseline_perplexity(model: Model, tokenizer, estimates: dict[str, int], device: str, on_window=None) -> dict:
    """The unquantized weights' perplexity: computed once per snapshot, reused by every format
    made from it; loaded only when FP32 fits in what is free now."""
    if tokenizer is None:
        return {}
    known = model.known_baseline()
    if known is not None:
        return {"perplexity_baseline": known}
    if estimates["FP32"] > quantize.memory_budget(settings.GPU_MEMORY_LIMIT, device):
        log.info("model %s: FP32 does not fit now; no baseline perplexity", model.id)
        return {}
    try:
        baseline = quantize.load_in_format(model.raw_dir, "FP32", device)
    except Exception:  # noqa: BLE001
        log.exception("model %s: the FP32 baseline could not be loaded; no baseline perplexity", model.id)
        return {}
    figures = _perplexity(model, baseline, tokenizer, "perplexity_baseline", on_window)
    del baseline
    quantize.free_accelerator_memory()
    return figures


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
