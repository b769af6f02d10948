"""File helpers shared by the modules that write files: temp-file-and-rename replacement."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def temp_beside(path: Path) -> Iterator[Path]:
    """A unique temp path in `path`'s folder (so os.replace is atomic); removed unless moved."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.part"
    # Not mkstemp: its 0600 mode would survive os.replace; written files honour the umask.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with temp_beside(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
