"""Text PostgreSQL can store: no NUL, no unpaired surrogate (it must encode as UTF-8).
Django-free: the dataset readers refuse such rows too."""

UNSTORABLE = "Text may not contain NUL characters or unpaired surrogates."


def storable(text: str) -> bool:
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
