from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_not_required
from django.contrib.staticfiles.views import serve as serve_static
from django.urls import include, path, re_path
from django.views.generic import RedirectView

from .health import healthz

urlpatterns = [
    path("healthz", healthz, name="healthz"),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    # One process serves everything (no separate web server to set up); the files are
    # small, public and cached by the browser.
    re_path(r"^static/(?P<path>.*)$", login_not_required(serve_static), {"insecure": True}),
    # Clients that ask for /favicon.ico without reading the page's <link rel="icon">.
    path("favicon.ico", login_not_required(RedirectView.as_view(url="/static/favicon.svg", permanent=True))),
    path("", include("activations_app.urls")),
    path("", include("models_app.urls")),
]

handler400 = "mistudio.hardening.bad_request"
handler403 = "mistudio.hardening.permission_denied"
handler404 = "mistudio.hardening.page_not_found"
handler500 = "mistudio.hardening.server_error"
