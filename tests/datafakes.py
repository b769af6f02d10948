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
