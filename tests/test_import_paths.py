"""Import paths never reach past the import folders, and a refusal never tells a client what
lies outside them (issue 17, item 10): a symlink's target, the server's working directory
and its absolute paths stay out of every message; a bare or relative name is looked up in
the import folder, not in the server's working directory."""

import os

import pytest

from models_app.tests.support import ROOT

pytestmark = pytest.mark.django_db(transaction=True)


def refusal(response) -> str:
    assert response.status_code == 400, response.content
    return response.json()["error"]["message"]


def test_refusals_name_the_path_as_given_never_where_it_leads(signed_in, data_dir, settings):
    imports = data_dir / "imports"
    os.symlink("/etc/passwd", imports / "notes.txt")
    message = refusal(signed_in.post("/api/datasets", {"path": str(imports / "notes.txt")}, content_type="application/json"))
    assert "outside the allowed import folders" in message and "/etc/passwd" not in message and "notes.txt" in message
    from mistudio.errors import ServiceError
    from models_app import services as model_services

    for path in ("../../../../etc/hostname", "~/.ssh/id_rsa", "./../../secret"):
        message = refusal(signed_in.post("/api/datasets", {"path": path}, content_type="application/json"))
        with pytest.raises(ServiceError) as caught:
            model_services.request_import(user=None, path=path, enqueue=False)  # the model import's own check
        for said in (message, caught.value.message):
            assert "outside the allowed import folders" in said and repr(path) in said, said
            assert str(ROOT) not in said and os.path.expanduser("~") + "/" not in said and "/etc/" not in said.replace(path, "")


def test_a_bare_name_is_looked_up_in_the_import_folder_not_the_servers_working_directory(signed_in, data_dir, hub):
    assert (ROOT / "scripts").is_dir() and os.getcwd() == str(ROOT)  # a folder of the server's own
    response = signed_in.post("/api/datasets", {"path": "scripts"}, content_type="application/json")
    assert response.status_code in (400, 404, 409) and str(ROOT) not in response.content.decode()
    assert response.json()["error"]["code"] not in ("path_not_allowed", "path_not_found")  # taken as a Hub repo id
    (data_dir / "imports" / "lines.txt").write_text("one line\nanother line\n")
    too_long = signed_in.post("/api/datasets", {"path": "./" + "a" * 300}, content_type="application/json")
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "path_not_found"  # not a 500
    for given in ("lines.txt", "./lines.txt"):
        created = signed_in.post("/api/datasets", {"path": given}, content_type="application/json")
        assert created.status_code == 201, created.content
