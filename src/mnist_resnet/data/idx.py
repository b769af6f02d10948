"""The IDX file format, read strictly: sizes are checked against the header before anything is
allocated or decompressed, so a hostile or damaged file costs a one-line error, not memory."""

from __future__ import annotations

import gzip
import io
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from mnist_resnet.data.datasets import IMAGE_SIZE
from mnist_resnet.data.errors import IDXError
from mnist_resnet.files import CHUNK, temp_beside

IDX_UINT8 = 0x08
# Far above any MNIST-style file (EMNIST byclass is 0.55 GB), far below what would hurt a laptop.
MAX_IDX_BYTES = 1 << 30
# DEFLATE cannot expand data by more than about 1,032 to 1, so a header claiming more than
# that times the .gz size is a lie we can refuse before decompressing anything.
_DEFLATE_MAX_RATIO = 1032
_GZIP_MAGIC = b"\x1f\x8b"


def is_gzip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(2) == _GZIP_MAGIC


def open_read(path: Path, gz: bool) -> io.BufferedIOBase:
    return gzip.GzipFile(path, "rb") if gz else path.open("rb")


def _read_header(f: io.BufferedIOBase, path: Path, ndim: int | None) -> tuple[int, ...]:
    magic = f.read(4)
    if len(magic) < 4:
        raise IDXError(f"{path}: truncated header ({len(magic)} bytes)")
    if magic[0] or magic[1]:
        raise IDXError(f"{path}: bad magic number 0x{magic.hex()} (an IDX file starts 0x0000)")
    if magic[2] != IDX_UINT8:
        raise IDXError(
            f"{path}: IDX data type code 0x{magic[2]:02x} is not supported (only 0x08, uint8)"
        )
    if magic[3] == 0 or (ndim is not None and magic[3] != ndim):
        want = f"expected {ndim}" if ndim is not None else "expected at least 1"
        raise IDXError(f"{path}: header has {magic[3]} dimensions, {want}")
    raw = f.read(4 * magic[3])
    if len(raw) < 4 * magic[3]:
        raise IDXError(f"{path}: truncated header (dimension sizes missing)")
    return struct.unpack(f">{magic[3]}I", raw)


def _check_claim(path: Path, dims: tuple[int, ...], gz: bool, max_bytes: int) -> int:
    """Refuse a header whose claimed size the file cannot hold, before allocating anything."""
    claimed = math.prod(dims)
    file_size = path.stat().st_size
    if claimed > max_bytes:
        raise IDXError(f"{path}: header claims {dims} = {claimed} bytes, over {max_bytes}")
    if not gz:
        actual = file_size - 4 - 4 * len(dims)
        if actual < claimed:
            raise IDXError(f"{path}: short payload: {actual} bytes, header {dims} claims {claimed}")
        if actual > claimed:
            raise IDXError(f"{path}: {actual - claimed} trailing bytes after the {dims} payload")
    elif claimed > _DEFLATE_MAX_RATIO * file_size:
        raise IDXError(
            f"{path}: header claims {claimed} bytes, more than a {file_size}-byte .gz can hold"
        )
    return claimed


def _read_payload(f: io.BufferedIOBase, path: Path, claimed: int) -> bytearray:
    buf = bytearray(claimed)
    view = memoryview(buf)
    got = 0
    while got < claimed:
        n = f.readinto(view[got : got + CHUNK])
        if not n:
            raise IDXError(f"{path}: short payload: {got} bytes, header claims {claimed}")
        got += n
    # Read at most one byte past the claim: a gzip bomb stops here, and for .gz this also
    # reaches the trailer, where gzip checks the CRC.
    if f.read(1):
        raise IDXError(f"{path}: trailing bytes after the {claimed}-byte payload")
    return buf


def read_idx(
    path: Path | str, *, ndim: int | None = None, max_bytes: int = MAX_IDX_BYTES
) -> Tensor:
    """Read a uint8 IDX file, gzip-compressed or not (sniffed, not guessed from the name)."""
    path = Path(path)
    try:
        gz = is_gzip(path)
        with open_read(path, gz) as f:
            dims = _read_header(f, path, ndim)
            claimed = _check_claim(path, dims, gz, max_bytes)
            buf = _read_payload(f, path, claimed)
    except FileNotFoundError:
        raise IDXError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as e:
        raise IDXError(f"{path}: unreadable or corrupt gzip stream ({e})") from e
    if claimed == 0:
        return torch.empty(dims, dtype=torch.uint8)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dims)


def read_images(path: Path | str) -> Tensor:
    images = read_idx(path, ndim=3)
    if tuple(images.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise IDXError(f"{path}: images are {tuple(images.shape[1:])}, expected 28x28")
    return images


def read_labels(path: Path | str, num_classes: int = 10) -> Tensor:
    labels = read_idx(path, ndim=1)
    bad = (labels >= num_classes).nonzero()
    if len(bad):
        i = int(bad[0])
        raise IDXError(
            f"{path}: label {int(labels[i])} at index {i} is out of range 0..{num_classes - 1}"
        )
    return labels


def read_split(
    images_path: Path | str, labels_path: Path | str, num_classes: int = 10
) -> tuple[Tensor, Tensor]:
    """Images (N,28,28) uint8 and labels (N,) int64 (what cross_entropy wants), counts checked."""
    images = read_images(images_path)
    labels = read_labels(labels_path, num_classes)
    if len(images) != len(labels):
        raise IDXError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    return images, labels.long()


def write_idx(path: Path | str, data: Tensor) -> None:
    """Write a uint8 tensor as IDX (gzip-compressed if the name ends in .gz), atomically."""
    path = Path(path)
    if data.dtype != torch.uint8 or not 1 <= data.dim() <= 255:
        raise IDXError(f"{path}: can only write uint8 tensors, got {data.dtype} {data.dim()}-d")
    header = bytes([0, 0, IDX_UINT8, data.dim()]) + struct.pack(f">{data.dim()}I", *data.shape)
    payload = memoryview(cast(Any, data.detach().cpu().contiguous().view(-1).numpy()))
    with temp_beside(path) as tmp:
        with tmp.open("wb") as raw:
            out: io.BufferedIOBase = (
                gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0)
                if path.suffix == ".gz"
                else raw
            )
            out.write(header)
            out.write(payload)
            out.close()
        os.replace(tmp, path)
