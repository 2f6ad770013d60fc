"""The API's error shape: {"error": {"code", "message", "details", "retryable"}}."""

from django.http import JsonResponse


class ServiceError(Exception):
    """A refusal from a service, with the HTTP status the API answers with."""

    status = 400

    def __init__(self, code: str, message: str, *, details: dict | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}
        self.retryable = retryable


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


class Unavailable(ServiceError):
    status = 503


def error_response(status: int, code: str, message: str, details: dict | None = None, retryable: bool = False):
    body = {"error": {"code": code, "message": message, "details": details or {}, "retryable": retryable}}
    return JsonResponse(body, status=status)
