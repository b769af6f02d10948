"""Fakes shared by the data tests: tiny synthetic MNIST-layout datasets and local HTTP mirrors."""

from __future__ import annotations

import gzip
import hashlib
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from mnist_resnet import data
from mnist_resnet.data import (
    DATASETS,
    DatasetSpec,
)

NAMES = [fs.name for fs in DATASETS["mnist"].files]


def quiet(_: str) -> None:
    """Tests that do not check progress lines keep pytest's output clean."""


# ----------------------------------------------------------------------------- helpers


def idx_bytes(t: torch.Tensor) -> bytes:
    """IDX encoding written independently of data.write_idx, so each checks the other."""
    return bytes([0, 0, 8, t.dim()]) + struct.pack(f">{t.dim()}I", *t.shape) + t.numpy().tobytes()


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@dataclass
class Tiny:
    """A small synthetic MNIST-layout dataset and the spec that pins its content."""

    spec: DatasetSpec
    tensors: dict[str, torch.Tensor]

    def content(self, name: str) -> bytes:
        return idx_bytes(self.tensors[name])

    def gz(self, name: str) -> bytes:
        return gzip.compress(self.content(name), mtime=0)

    def place(self, folder: Path, *, compressed: bool) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        for name in self.tensors:
            if compressed:
                (folder / f"{name}.gz").write_bytes(self.gz(name))
            else:
                (folder / name).write_bytes(self.content(name))
        return folder


def make_tiny(n_train: int = 12, n_test: int = 6, seed: int = 0, md5_only: bool = False) -> Tiny:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        NAMES[0]: torch.randint(0, 256, (n_train, 28, 28), generator=g, dtype=torch.uint8),
        NAMES[1]: torch.randint(0, 10, (n_train,), generator=g, dtype=torch.uint8),
        NAMES[2]: torch.randint(0, 256, (n_test, 28, 28), generator=g, dtype=torch.uint8),
        NAMES[3]: torch.randint(0, 10, (n_test,), generator=g, dtype=torch.uint8),
    }
    tiny = Tiny(DATASETS["mnist"], tensors)  # spec replaced below, once hashes are known
    shas = [sha256(tiny.content(n)) for n in NAMES]
    md5s = [hashlib.md5(tiny.gz(n)).hexdigest() for n in NAMES]
    files = (
        data.mnist_style_files(n_train, n_test, [None] * 4, md5s)
        if md5_only
        else data.mnist_style_files(n_train, n_test, shas)
    )
    tiny.spec = DatasetSpec(
        name="tiny",
        folder="Tiny",
        files=files,
        mirrors=(),
        classes=tuple(str(i) for i in range(10)),
        mean=0.5,
        std=0.29,
    )
    return tiny


def leftovers(folder: Path) -> list[str]:
    """Temp files a failed or finished fetch must not leave behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


class _FileHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = self.server.files.get(self.path.lstrip("/"))  # type: ignore[attr-defined]
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def http_mirror(files: dict[str, bytes]) -> Iterator[str]:
    """Serve `files` (name -> bytes) from 127.0.0.1; anything else is a 404."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FileHandler)
    server.files = files  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def silent_server() -> Iterator[str]:
    """Accepts connections (the kernel completes the handshake) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}/"


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


# ----------------------------------------------------------------------------- own data

SHAPES = ("cross", "disc", "square")


def shape_image(kind: str, size: int, jitter: int, *, mode: str = "L") -> Any:
    """A dark shape on a light background, `size` pixels square, moved by `jitter` pixels."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (size, size), 230)
    draw = ImageDraw.Draw(img)
    lo, hi = size // 4 + jitter, 3 * size // 4 + jitter
    if kind == "disc":
        draw.ellipse((lo, lo, hi, hi), fill=20)
    elif kind == "square":
        draw.rectangle((lo, lo, hi, hi), outline=20, width=max(1, size // 10))
    else:
        draw.line((lo, lo, hi, hi), fill=20, width=max(1, size // 10))
        draw.line((lo, hi, hi, lo), fill=20, width=max(1, size // 10))
    return img.convert(mode)


def make_image_folder(
    root: Path,
    *,
    per_class: int = 8,
    classes: tuple[str, ...] = SHAPES,
    test_per_class: int = 0,
    size: int = 24,
) -> Path:
    """One sub-folder of small PNG/JPEG shapes per class (and test/ if asked): a user's folder."""
    for split, count in (("", per_class), ("test", test_per_class)):
        for name in classes if count else ():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = shape_image(name, size, i % 3 - 1, mode="RGB" if i % 2 else "L")
                img.save(folder / f"{i:03d}.{'jpg' if i % 4 == 3 else 'png'}")
    return root


def make_npz(path: Path, *, per_class: int = 8, names: bool = True, **extra: Any) -> Path:
    """x (N,28,28) uint8 and y of the three shapes, with class_names unless `names` is False."""
    import numpy as np

    images, labels = [], []
    for label, name in enumerate(SHAPES):
        for i in range(per_class):
            images.append(np.asarray(shape_image(name, 28, i % 3 - 1), dtype=np.uint8))
            labels.append(label)
    arrays: dict[str, Any] = {"x": np.stack(images), "y": np.asarray(labels, dtype=np.int64)}
    if names:
        arrays["class_names"] = np.asarray(SHAPES)
    arrays.update(extra)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


@dataclass(frozen=True)
class ShapesRun:
    """A run of `train --dataset folder:PATH` on three classes of small generated shapes."""

    folder: Path
    run_dir: Path
    flags: tuple[str, ...]

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "best.pt"
