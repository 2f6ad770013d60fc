"""Outputs are written into a temporary sibling folder and moved into place whole, so a
failed or cancelled job never leaves a half-written folder where a good one is expected.
Django-free: the `ml/` packages stage their outputs with it too."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def staged_path(final: Path) -> Path:
    """The temporary sibling a job writes into: same filesystem, so the move is a rename."""
    return final.with_name(f".{final.name}.partial")


def promote(tmp: Path, final: Path) -> Path:
    """Move a finished temporary folder into place, replacing an older `final`."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """A fresh temporary folder beside `final`, moved into place when the block completes
    and removed when it raises."""
    tmp = staged_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        promote(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
