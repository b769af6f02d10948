"""File helpers shared by every module that writes or checks files: atomic replacement, hashing,
and the proof that an output folder a flag names can be written, before the long part.

A result file is written to a temp file beside it and renamed into place, so a reader (or a run
killed mid-write) sees the old file or the whole new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from mnist_resnet.settings import ConfigError

CHUNK = 1 << 20
# Temp files end in this suffix: a resumed run sweeps the ones a kill left behind.
TEMP_SUFFIX = ".tmp"


@contextmanager
def temp_beside(path: Path) -> Iterator[Path]:
    """A unique temp path in `path`'s folder (so os.replace is atomic); removed unless moved."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
    # Not mkstemp: its owner-only mode would survive os.replace; written files honour the umask.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[BinaryIO], object], *, durable: bool = False) -> None:
    """Replace `path` with what `write` writes to the file object it is given.

    `durable` also flushes the data and the folder entry to the disk before returning, for
    files a crash must not lose (checkpoints), at the cost of an fsync each.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with temp_beside(path) as tmp:
        with tmp.open("wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    if durable:
        _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) so that a reader never sees a half-written file."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _fsync_dir(folder: Path) -> None:
    # The rename is only durable once the directory entry itself reaches the disk.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prove_writable(folder: Path) -> None:
    """Create `folder` if needed and write (then remove) a file in it; raises OSError if not.

    For the commands that would otherwise find out only after their long part.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
        pass


def writable_folder(folder: Path, flag: str) -> Path:
    """Prove a file can be written in `folder`, before the long part. Folders made for the
    proof are removed again: a command that then fails leaves nothing behind (the command
    makes them when it writes there)."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        prove_writable(folder)
    except OSError as e:
        raise ConfigError(f"{flag} {folder}: cannot write there ({e.strerror or e})") from None
    finally:
        for path in made:  # deepest first
            with contextlib.suppress(OSError):
                path.rmdir()
    return folder


def writable_file(path: Path, flag: str) -> Path:
    """`writable_folder` for a file's folder, after checking `path` is not a folder."""
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file name")
    writable_folder(path.parent, flag)
    return path


def hash_file(path: Path, algo: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.new(algo)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
