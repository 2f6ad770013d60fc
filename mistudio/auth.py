"""Every page, API call and WebSocket needs a signed-in user; the API also takes tokens."""

from django.contrib.auth.middleware import LoginRequiredMiddleware as DjangoLoginRequired
from django.utils.deprecation import MiddlewareMixin

from .api import error_response
from .models import ApiToken


def is_api_path(path: str) -> bool:
    return path.startswith("/api/")


class ApiTokenMiddleware(MiddlewareMixin):
    """`Authorization: Bearer <token>` on /api/ (and /healthz) signs the request in as the token's user.
    Listed before CsrfViewMiddleware: a bearer request carries no cookie to forge."""

    def process_view(self, request, view_func, view_args, view_kwargs):
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return None
        if request.path == "/healthz":  # staff's token shows the details; any other, the bare status
            request.user = ApiToken.user_for(header.removeprefix("Bearer ").strip()) or request.user
            return None
        if not is_api_path(request.path):
            return None
        user = ApiToken.user_for(header.removeprefix("Bearer ").strip())
        if user is None:
            return error_response(401, "invalid_api_token", "The API token is invalid or has been revoked.")
        request.user = user
        request._dont_enforce_csrf_checks = True
        return None


class LoginRequiredMiddleware(DjangoLoginRequired):
    """Django's login-required default, answering the API with a JSON 401 instead of a redirect."""

    def handle_no_permission(self, request, view_func):
        if is_api_path(request.path):
            return error_response(
                401, "not_authenticated", "Sign in or send an API token (Authorization: Bearer …)."
            )
        return super().handle_no_permission(request, view_func)
