"""Strict checks on user text before anything is queued or written."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import InvalidInput

# The Hub's own rule: optional namespace, then a name; ASCII letters, digits, "-", "_",
# "."; each part at most 96 characters; no "--" or ".."; no leading/trailing "-" or ".".
_REPO_PART = re.compile(r"[A-Za-z0-9_.\-]{1,96}")
_REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-/]{0,199}")
MAX_REPO_ID_LENGTH = 96 * 2 + 1
GGUF_MAGIC = b"GGUF"


NOT_WHOLE, OUT_OF_RANGE = "not_whole_number", "out_of_range"  # bounded_int's two refusals, as codes


def bounded_int(value, field: str, low: int, high: int, *, label: str | None = None) -> int | None:
    """The one parser of bounded integers from users: an int (not a bool) or ASCII decimal
    digits with an optional "-" ("²", "１", "2.5", "1e3" are not), within low..high. A digit
    string longer than the bound's own is out of range before `int()` is asked (which
    refuses more than 4,300 digits with a ValueError). None or "" is None: the caller's
    default. Refusals are InvalidInput naming the field."""
    name = label or field
    if value is None or value == "":
        return None
    if isinstance(value, str):
        text = value.strip()
        digits = text[1:] if text.startswith("-") else text
        if not (digits.isascii() and digits.isdigit()):
            raise InvalidInput(field, f"{name} must be a whole number.", code=NOT_WHOLE)
        if len(digits.lstrip("0")) > len(str(max(abs(low), abs(high)))):
            raise InvalidInput(field, f"{name} must be between {low:,} and {high:,}.", code=OUT_OF_RANGE)
        value = int(text)
    elif isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(field, f"{name} must be a whole number.", code=NOT_WHOLE)
    if not low <= value <= high:
        raise InvalidInput(field, f"{name} must be between {low:,} and {high:,}.", code=OUT_OF_RANGE)
    return value



def validate_repo_id(value: str) -> str:
    def bad(reason: str) -> InvalidInput:
        return InvalidInput("repo_id", f"Invalid repository id: {reason}.", code="invalid_repo_id")

    if value is None or value == "":
        raise bad("it is empty; use the form owner/name, e.g. HuggingFaceTB/SmolLM2-135M")
    if "\x00" in value:
        raise bad("it contains a NUL character")
    if any(ch.isspace() for ch in value):
        raise bad("it contains whitespace")
    if not value.isascii():
        raise bad("it contains non-ASCII characters")
    if "://" in value or value.lower().startswith(("http:", "https:", "www.")):
        raise bad("give the repository id (owner/name), not a URL")
    if len(value) > MAX_REPO_ID_LENGTH:
        raise bad(f"it is {len(value)} characters long; the Hub allows at most {MAX_REPO_ID_LENGTH}")
    parts = value.split("/")
    if len(parts) > 2:
        raise bad("it has more than one '/'; use owner/name")
    for part in parts:
        if len(part) > 96:
            raise bad(f"each part may be at most 96 characters; one has {len(part)}")
        if not _REPO_PART.fullmatch(part):
            raise bad(f"{part!r} may only use letters, digits, '-', '_' and '.' (1–96 characters)")
        if ".." in part or "--" in part:
            raise bad("'..' and '--' are not allowed")
        if part[0] in "-." or part[-1] in "-.":
            raise bad("a part may not start or end with '-' or '.'")
    if value.lower().endswith(".git"):
        raise bad("drop the '.git' suffix")
    return value


def validate_revision(value: str | None) -> str:
    if value is None or value == "":
        return "main"
    if not value.isascii() or any(ch.isspace() for ch in value) or "\x00" in value:
        raise InvalidInput("revision", "Invalid revision: it may not contain spaces or non-ASCII characters.")
    if not _REVISION.fullmatch(value) or ".." in value or value.endswith(("/", ".lock")):
        raise InvalidInput(
            "revision", "Invalid revision: use a branch, tag or commit id (letters, digits, '-', '_', '.', '/')."
        )
    return value


def inside_roots(resolved: Path, roots: list[Path]) -> bool:
    """Whether a fully resolved path (symlinks followed) lies in one of the allowed roots."""
    return any(resolved == root or resolved.is_relative_to(root) for root in roots)


def resolve_import_path(value: str, roots: list[Path], allow_files: tuple[str, ...] | None = None) -> Path:
    """The real path of a local import, refused unless it lies inside an allowed root.
    Models: a folder or a .gguf file; with `allow_files`, a file with one of those suffixes."""
    if not value or "\x00" in value:
        raise InvalidInput("path", "Give the path of a model folder or a .gguf file.")
    # A relative path is read inside the first import folder, never against the server's
    # working directory; a refusal names the path as it was given, never what it resolved to
    # (a symlink's target, the server's own folders).
    given = Path(value).expanduser()
    if not given.is_absolute() and roots:
        given = Path(roots[0]) / given
    path = given.resolve()
    if not inside_roots(path, roots):
        allowed = ", ".join(str(root) for root in roots) or "(none configured)"
        raise InvalidInput(
            "path",
            f"{value!r} is outside the allowed import folders ({allowed}); "
            "move it there or set MISTUDIO_IMPORT_ROOTS.",
            code="path_not_allowed",
        )
    try:
        exists = path.exists()
    except OSError:  # a name too long for the filesystem, and the like
        raise InvalidInput("path", f"{value[:200]!r} is not a path this server can read.", code="path_not_found") from None
    if not exists:
        raise InvalidInput("path", f"{path} does not exist.", code="path_not_found")
    if allow_files is not None:
        if not path.is_file() or path.suffix.lower() not in allow_files:
            raise InvalidInput("path", f"{path} is not a {', '.join(allow_files)} file.")
        return path
    if path.is_dir():
        escaping = [entry.name for entry in sorted(path.iterdir()) if not inside_roots(entry.resolve(), roots)]
        if escaping:
            raise InvalidInput(
                "path",
                f"{path} holds links to files outside the allowed import folders ({', '.join(escaping[:5])}); "
                "copy the files in instead of linking them.",
                code="path_not_allowed",
            )
        if not (path / "config.json").is_file():
            raise InvalidInput("path", f"{path} has no config.json; a model folder needs config.json and weights.")
        if not any(path.glob("*.safetensors")):
            raise InvalidInput("path", f"{path} has no .safetensors weights.")
        return path
    if path.suffix.lower() != ".gguf":
        raise InvalidInput("path", f"{path} is neither a model folder nor a .gguf file.")
    with path.open("rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise InvalidInput("path", f"{path} is not a GGUF file (its first bytes are not 'GGUF').", code="not_gguf")
    return path


MAX_TOKEN_LENGTH = 1000


def validate_token(value: str | None) -> str | None:
    """A Hub access token as pasted (surrounding whitespace dropped), or None when none was
    given. It goes into an HTTP header, so anything but printable ASCII is refused here
    rather than failing later as a network error."""
    value = (value or "").strip()
    if not value:
        return None
    if len(value) > MAX_TOKEN_LENGTH or not all("!" <= ch <= "~" for ch in value):
        raise InvalidInput(
            "access_token",
            "The access token may only contain printable ASCII characters (no spaces, line breaks or NUL).",
            code="invalid_token",
        )
    return value


def validate_hub_source(repo_id: str, revision: str | None, token: str | None) -> tuple[str, str, str | None]:
    """What every Hub request names: a repo, a revision (main by default) and maybe a token."""
    return validate_repo_id(repo_id), validate_revision(revision), validate_token(token)
