"""What the model commands share: --sync/--json, the terminal progress bar, and turning a
failure into a non-zero exit with a one-line reason on stderr."""

from __future__ import annotations

import json
import sys
import time

from django.core.management.base import BaseCommand, CommandError

from mistudio.errors import ServiceError
from models_app.ml.hub import format_bytes
from models_app.models import Model, ModelStatus


def eta_text(seconds: float | None) -> str:
    return f"{seconds:.0f}s" if seconds is not None else "?"


def download_detail(model: Model) -> str:
    if model.bytes_total and model.status == ModelStatus.DOWNLOADING:
        return (f"{format_bytes(model.bytes_done)}/{format_bytes(model.bytes_total)}  {model.speed_mbps:.1f} MB/s  "
                f"ETA {eta_text(model.eta_seconds)}")  # fmt: skip
    return ""


class TerminalProgress:
    """A one-line progress bar on stderr for a running row (a model or an extraction),
    redrawn at most 10 times a second; `detail` adds the row's own figures."""

    WIDTH = 30

    def __init__(self, stream=None, detail=download_detail) -> None:
        self.stream = stream or sys.stderr
        self.detail = detail
        self.last_draw = 0.0
        self.last_status = ""
        self.line_open = False

    def __call__(self, row) -> None:
        now = time.monotonic()
        if row.status == self.last_status and now - self.last_draw < 0.1 and row.is_running:
            return
        self.last_draw, self.last_status = now, row.status
        if not row.is_running:
            self.close()
            return
        filled = int(self.WIDTH * row.progress / 100)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        line = f"\r{row.status:<11} [{bar}] {row.progress:5.1f}%"
        detail = self.detail(row)
        if detail:
            line += f"  {detail}"
        self.stream.write(line.ljust(100))
        self.stream.flush()
        self.line_open = True

    def close(self) -> None:
        """End the bar's line, so what is printed next starts on its own."""
        if self.line_open:
            self.stream.write("\n")
            self.stream.flush()
            self.line_open = False


class ModelCommand(BaseCommand):
    """Base for commands that start a model job."""

    def add_job_arguments(self, parser) -> None:
        parser.add_argument("--sync", action="store_true", help="Run the job here with a progress bar instead of queueing it.")
        parser.add_argument("--json", action="store_true", help="Print the final record as one JSON object on the last line.")

    def run_job(self, model: Model, runner, options) -> None:
        if options["sync"]:
            bar = TerminalProgress()
            try:
                runner(model.id, listener=bar)
            except Exception as exc:
                model.refresh_from_db()
                if model.is_running:  # the job could not even record its failure
                    raise CommandError(f"{model.id} failed: {type(exc).__name__}: {exc}") from None
            finally:
                bar.close()
            model.refresh_from_db()
        self.report(model, options, finished=options["sync"])

    def report(self, model: Model, options, finished: bool) -> None:
        if options["json"]:
            self.stdout.write(json.dumps(model.as_dict()))
        elif finished:
            self.stdout.write(describe(model))
        else:
            self.stdout.write(f"Queued {model.id} ({model.name}); follow it with `manage.py list_models`.")
        if model.status == ModelStatus.ERROR:
            raise CommandError(f"{model.id} failed [{model.error_code}]: {model.error_message}")
        if model.status == ModelStatus.CANCELLED:
            raise CommandError(f"{model.id} was cancelled.")


def describe(model: Model) -> str:
    parts = [model.id, model.status, model.name, model.quantization]
    if model.params_count:
        parts.append(f"{model.params_count:,} params")
    if model.memory_required_bytes:
        parts.append(f"{format_bytes(model.memory_required_bytes)} memory")
    if model.disk_size_bytes:
        parts.append(f"{format_bytes(model.disk_size_bytes)} on disk")
    return "  ".join(parts)


def service_call(func, *args, **kwargs):
    try:
        return func(*args, **kwargs)
    except ServiceError as exc:
        raise CommandError(f"[{exc.code}] {exc.message}") from None
