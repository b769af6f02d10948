"""The verified cache: files are installed only after their content hash matched, and
``<root>/<Folder>/raw/SOURCES.json`` records where each came from with a size/mtime stamp."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnist_resnet.data.datasets import SOURCES_FILE, DatasetSpec, FileSpec, get_spec, raw_dir
from mnist_resnet.data.errors import DataError
from mnist_resnet.data.idx import is_gzip, open_read
from mnist_resnet.files import CHUNK, hash_file, temp_beside


class Rejected(Exception):
    """One source could not supply one file; the message is the reason, for DataUnavailable."""


@dataclass
class Verified:
    sha256: str
    source: str
    verified_by: str


def _copy_capped(src: io.BufferedIOBase, dst: io.BufferedIOBase, limit: int) -> tuple[str, int]:
    """Copy and hash at most `limit` + 1 bytes; returns (sha256, bytes copied)."""
    h = hashlib.sha256()
    seen = 0
    while seen <= limit and (chunk := src.read(min(CHUNK, limit + 1 - seen))):
        h.update(chunk)
        dst.write(chunk)
        seen += len(chunk)
    return h.hexdigest(), seen


def _authority(fs: FileSpec, gz: bool, recorded: str | None) -> tuple[str | None, str]:
    """What verifies this candidate: (expected content sha256 or None for the .gz MD5, label)."""
    if fs.sha256 is not None:
        return fs.sha256, "sha256"
    if gz and fs.gz_md5 is not None:
        return None, "md5 of official .gz"
    if recorded is not None:
        return recorded, "sha256 recorded at first fetch"
    raise Rejected(f"{fs.name}: only the official .gz can be verified (by its MD5)")


def install(candidate: Path, dest: Path, fs: FileSpec, recorded: str | None) -> Verified:
    """Verify `candidate` (.gz or not) and place its decompressed content at `dest`.

    The content goes to a temp file first and is moved into place only once verified, so a
    wrong or half-written file never sits under its final name. `source` is left to the caller.
    """
    try:
        gz = is_gzip(candidate)
        expected, by = _authority(fs, gz, recorded)
        if expected is None and (md5 := hash_file(candidate, "md5")) != fs.gz_md5:
            raise Rejected(f"{candidate.name}: MD5 {md5} does not match {fs.gz_md5}")
        if not gz and candidate.stat().st_size != fs.size:
            raise Rejected(f"{fs.name}: {candidate.stat().st_size} bytes, expected {fs.size}")
        if not gz and candidate.resolve() == dest.resolve():  # already in the cache
            sha = hash_file(candidate, "sha256")
            check_content(fs, sha, fs.size, expected)
            return Verified(sha, str(candidate), by)
        with temp_beside(dest) as tmp:
            with open_read(candidate, gz) as src, tmp.open("wb") as out:
                sha, seen = _copy_capped(src, out, fs.size)
            check_content(fs, sha, seen, expected)
            os.replace(tmp, dest)
        return Verified(sha, str(candidate), by)
    except (OSError, EOFError, zlib.error) as e:
        raise Rejected(f"{candidate.name}: unreadable ({e})") from e


def check_content(fs: FileSpec, sha: str, size: int, expected: str | None) -> None:
    if size != fs.size:
        got = f"{size} bytes" if size <= fs.size else "more bytes"
        raise Rejected(f"{fs.name}: {got} than the expected {fs.size}")
    if expected is not None and sha != expected:
        raise Rejected(f"{fs.name}: content SHA-256 {sha[:16]}… is not {expected[:16]}…")


def read_stamp(raw: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads((raw / SOURCES_FILE).read_text())
    except (OSError, ValueError):
        return {}  # a missing or damaged stamp only costs one re-verification
    files = data.get("files") if isinstance(data, dict) else None
    return files if isinstance(files, dict) else {}


def write_stamp(raw: Path, spec: DatasetSpec, verified: Mapping[str, Verified]) -> None:
    files = {}
    for fs in spec.files:
        st = (raw / fs.name).stat()
        v = verified[fs.name]
        files[fs.name] = {
            "source": v.source,
            "sha256": v.sha256,
            "verified_by": v.verified_by,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
        }
    text = json.dumps({"dataset": spec.name, "files": files}, indent=2) + "\n"
    with temp_beside(raw / SOURCES_FILE) as tmp:
        tmp.write_text(text)
        os.replace(tmp, raw / SOURCES_FILE)


def stamp_matches(raw: Path, spec: DatasetSpec, stamp: Mapping[str, Mapping[str, Any]]) -> bool:
    """The cheap check `load` trusts: every file has the size and mtime it had when verified."""
    for fs in spec.files:
        rec = stamp.get(fs.name)
        try:
            st = (raw / fs.name).stat()
        except OSError:
            return False
        if (
            rec is None
            or not isinstance(rec.get("sha256"), str)
            or (fs.sha256 is not None and rec["sha256"] != fs.sha256)
            or rec.get("size") != st.st_size
            or st.st_size != fs.size
            or rec.get("mtime_ns") != st.st_mtime_ns
        ):
            return False
    return True


def verify(dataset: str | DatasetSpec, root: Path | str) -> list[str]:
    """Re-hash every cached file (the full check `load` skips); one report line per file."""
    spec = get_spec(dataset)
    raw = raw_dir(root, spec)
    stamp = read_stamp(raw)
    lines = []
    verified = {}
    for fs in spec.files:
        path = raw / fs.name
        if not path.is_file():
            raise DataError(f"{path} is missing; run fetch for {spec.name}")
        recorded = stamp.get(fs.name, {})
        expected = fs.sha256 or recorded.get("sha256")
        if not isinstance(expected, str):
            raise DataError(f"{path}: no hash recorded for it; run fetch for {spec.name} again")
        sha = hash_file(path, "sha256")
        if sha != expected or path.stat().st_size != fs.size:
            raise DataError(
                f"{path}: content SHA-256 {sha} is not the expected {expected} (a damaged "
                f"file); delete it and run `mnist-resnet data fetch --dataset {spec.name} "
                f"--data-dir {root}` to fetch it again"
            )
        by = "sha256" if fs.sha256 else "sha256 recorded at first fetch"
        verified[fs.name] = Verified(sha, str(recorded.get("source", path)), by)
        lines.append(f"{fs.name}  {sha}  OK ({by})")
    # Refresh the cheap check (after a copy changed mtimes, say); a read-only cache stays
    # verified all the same, only its cheap check goes stale.
    with contextlib.suppress(OSError):
        write_stamp(raw, spec, verified)
    return lines
