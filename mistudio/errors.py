"""Every error a user can act on, each with a stable code for the API, the card and the
commands. Django-free: the pure `ml/` packages raise these too."""

from __future__ import annotations


class InvalidInput(ValueError):
    """Input refused before anything is queued or written."""

    def __init__(self, field: str, message: str, code: str = "invalid_input") -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.code = code


class JobError(Exception):
    """A job failed for a reason the user can act on. The message is shown as is, so it
    must never contain a secret."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retryable: bool = False,
        suggested_format: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.suggested_format = suggested_format


# Stops a run can go on from, kept for a retry or resume: its worker went away, the time
# limit, an interrupt, the network, or memory another job may have been holding. Not a fault
# in the request or its data. One list: the lifecycle (mistudio.jobs) and a job that keeps a
# checkpoint of its own (an extraction) both read it.
RESUMABLE_CODES = frozenset({"worker_died", "timeout", "interrupted", "network_error", "out_of_memory"})


def resumable(exc: BaseException) -> bool:
    """Whether a run stopped by `exc` can go on from what it kept: a JobError whose code is
    one of those (or that says it is retryable), a cancel, the time limit or an interrupt;
    not an error in the code or the input (ValueError and its kind)."""
    if isinstance(exc, JobError):
        return exc.retryable or exc.code in RESUMABLE_CODES
    return not isinstance(exc, ValueError | TypeError | KeyError | IndexError | AttributeError)


class JobCancelled(Exception):
    """Raised inside a job when its row was cancelled, to unwind and clean up."""


class ServiceError(Exception):
    """A refusal from a service, with the HTTP status the API answers with."""

    status = 400

    def __init__(self, code: str, message: str, *, details: dict | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}
        self.retryable = retryable

    @classmethod
    def from_invalid(cls, exc: InvalidInput) -> ServiceError:
        return cls(exc.code, exc.message, details={"field": exc.field})


class Forbidden(ServiceError):
    status = 403


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


class Unavailable(ServiceError):
    status = 503
