"""The shape a newcomer relies on: `mistudio/` is the shared floor and imports no app; the
pure `ml/` packages and the Django-free parts of the floor they use import no Django."""

import ast
import subprocess
import sys
from pathlib import Path

from django.conf import settings

ROOT = Path(settings.BASE_DIR)
# Files of the floor that wire the apps together, and may name them.
WIRING = {"settings.py", "settings_test.py", "urls.py"}


def project_apps() -> list[str]:
    return [name for name in settings.INSTALLED_APPS if (ROOT / name).is_dir() and name != "mistudio"]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_shared_floor_imports_no_app():
    apps = project_apps()
    assert apps, "the project's apps were not found"
    offenders = [
        f"{path.relative_to(ROOT)}: {module}"
        for path in (ROOT / "mistudio").rglob("*.py")
        if path.name not in WIRING and "migrations" not in path.parts
        for module in imported_modules(path)
        if module.split(".")[0] in apps
    ]
    assert offenders == []
    # Nor does any file of the floor, wiring aside, name an app at all (an import_string).
    named = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "mistudio").rglob("*")
        if path.is_file() and path.name not in WIRING and "__pycache__" not in path.parts
        and any(app in path.read_text(errors="replace") for app in apps)
    ]  # fmt: skip
    assert named == []


def test_the_ml_packages_run_without_django():
    """Every ml/ module imports in a fresh interpreter without pulling Django in."""
    modules = [
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for app in project_apps()
        for path in sorted((ROOT / app / "ml").glob("*.py"))
        if path.name != "__init__.py"
    ]
    assert len(modules) > 5
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "leaked = sorted(m for m in sys.modules if m == 'django' or m.startswith('django.'))\n"
        "print(leaked)\n"
        "sys.exit(1 if leaked else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_apps_use_each_other_only_through_the_public_surface():
    """activations_app reaches models_app through its model lookup service, its row (the
    foreign key, by name) and the `ml` loading API; nothing else of it."""
    allowed = {"models_app.services", "models_app.ml"}
    apps = project_apps()
    offenders = []
    for app in apps:
        for path in (ROOT / app).rglob("*.py"):
            if "tests" in path.parts or "migrations" in path.parts:
                continue
            for module in imported_modules(path):
                top = module.split(".")[0]
                if top in apps and top != app and module not in allowed:
                    offenders.append(f"{path.relative_to(ROOT)}: {module}")
    assert offenders == []


def test_check_deploy_is_clean_with_the_documented_https_settings(tmp_path):
    import os
    import secrets

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MISTUDIO_", "DJANGO_"))}
    env.update(DJANGO_SETTINGS_MODULE="mistudio.settings", MISTUDIO_DATA_DIR=str(tmp_path), SECRET_KEY=secrets.token_urlsafe(50),
               ALLOWED_HOSTS="studio.example.org")  # fmt: skip
    command = [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"]
    plain = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert plain.returncode != 0 and "SECURE_HSTS_SECONDS" in plain.stderr + plain.stdout
    env.update(MISTUDIO_SSL_REDIRECT="1", MISTUDIO_HSTS_SECONDS="31536000", MISTUDIO_HSTS_INCLUDE_SUBDOMAINS="1",
               MISTUDIO_HSTS_PRELOAD="1", MISTUDIO_SECURE_COOKIES="1")  # fmt: skip
    secure = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert secure.returncode == 0, secure.stdout + secure.stderr
    assert "no issues" in secure.stdout


def test_compose_runs_web_workers_postgres_and_redis_each_with_a_healthcheck_and_a_restart_policy():
    import yaml

    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    assert set(services) == {"web", "worker", "postgres", "redis"}
    for name, service in services.items():
        assert service["restart"] == "unless-stopped", name
        assert service["healthcheck"]["test"], name
    assert "/healthz" in " ".join(services["web"]["healthcheck"]["test"])
    for name in ("web", "worker"):
        assert services[name]["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                                "redis": {"condition": "service_healthy"}}  # fmt: skip
    assert services["worker"]["command"] == ["worker"] and services["web"]["command"] == ["web"]
