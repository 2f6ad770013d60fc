"""What the job commands share: --sync/--json, the terminal progress bar, and turning a
failure into a non-zero exit with a one-line reason on stderr."""

from __future__ import annotations

import json
import os
import sys
import time

from django.core.management.base import BaseCommand, CommandError

from .errors import InvalidInput, JobError, ServiceError


def eta_text(seconds: float | None) -> str:
    return f"{seconds:.0f}s" if seconds is not None else "?"


class TerminalProgress:
    """A one-line progress bar on stderr for a running row (a model or an extraction),
    redrawn at most 10 times a second; `detail` adds the row's own figures."""

    WIDTH = 30

    def __init__(self, stream=None, detail=None) -> None:
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
            if row.is_ready and self.line_open:  # the bar ends full, not at its last throttled figure
                self.stream.write(f"\r{row.status:<11} [{'#' * self.WIDTH}] 100.0%".ljust(100))
            self.close()
            return
        filled = int(self.WIDTH * row.progress / 100)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        line = f"\r{row.status:<11} [{bar}] {row.progress:5.1f}%"
        detail = self.detail(row) if self.detail else ""
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


def add_user_argument(parser) -> None:
    parser.add_argument(
        "--user", metavar="USERNAME",
        help="Act as this user: new records are theirs, and only their own (or, for staff, any) may be "
             "cancelled or deleted. Without it the command acts as the operator, with full rights.",
    )  # fmt: skip


def acting_user(options):
    """The user --user names, or None (the operator at the shell)."""
    from django.contrib.auth import get_user_model

    username = options.get("user")
    if not username:
        return None
    user = get_user_model().objects.filter(username=username, is_active=True).first()
    if user is None:
        raise CommandError(f"No active user {username!r}.")
    return user


class JobCommand(BaseCommand):
    """Base for commands that start a tracked job: queued for a worker, or run here
    (--sync) with a progress bar; the outcome as a line, or the record as JSON."""

    def add_job_arguments(self, parser) -> None:
        parser.add_argument("--sync", action="store_true", help="Run the job here with a progress bar instead of queueing it.")
        parser.add_argument("--json", action="store_true", help="Print the final record as one JSON object on the last line.")
        add_user_argument(parser)

    def progress_detail(self, row) -> str:
        """The row's own figures beside the bar (bytes and speed, samples per second)."""
        return ""

    def describe(self, row) -> str:
        """The one line printed when a --sync job has ended."""
        return f"{row.pk}  {row.status}"

    def run_job(self, row, runner, options):
        if options["sync"]:
            bar = TerminalProgress(detail=self.progress_detail)
            try:
                runner(row.pk, listener=bar)
            except Exception as exc:
                row.refresh_from_db()
                if row.is_running:  # the job could not even record its failure
                    raise CommandError(f"{row.pk} failed: {type(exc).__name__}: {exc}") from None
            finally:
                bar.close()
            row.refresh_from_db()
        self.report(row, options, finished=options["sync"])
        return row

    def report(self, row, options, finished: bool) -> None:
        if options["json"]:
            self.stdout.write(json.dumps(row.as_dict()))
        elif finished:
            if getattr(row, "notice", ""):  # what the job had to say (files reused, a checkpoint not trusted)
                self.stderr.write(row.notice)
            self.stdout.write(self.describe(row))
        else:
            self.stdout.write(f"Queued {row.pk} ({row.label}){self.follow_hint}.")
        sys.stdout.flush()
        if row.status == row.FAILED:
            raise CommandError(f"{row.pk} failed [{row.error_code}]: {row.error_message}")
        if row.status == row.CANCELLED:
            raise CommandError(f"{row.pk} was cancelled; no files were kept.")

    follow_hint = ""  # where to watch a queued job


def token_from_env(variable: str | None) -> str | None:
    """The Hub token named by --token-env: a token is never an argument (ps, shell history)."""
    if not variable:
        return None
    token = os.environ.get(variable)
    if not token:
        raise CommandError(f"Environment variable {variable} is not set or empty.")
    return token


def service_call(func, *args, **kwargs):
    """A service's (or a job's) refusal as a one-line command error with its code."""
    try:
        return func(*args, **kwargs)
    except (ServiceError, JobError, InvalidInput) as exc:
        raise CommandError(f"[{exc.code}] {exc.message}") from None
