"""data.idx: the strict IDX reader and writer; hostile headers cost one line, not memory."""

from __future__ import annotations

import gzip
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest
import torch
from datafakes import (
    idx_bytes,
    leftovers,
)

from mnist_resnet import data
from mnist_resnet.data import (
    IDXError,
)

# ----------------------------------------------------------------------------- IDX format


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path: Path, suffix: str) -> None:
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([0, 9, 3, 3, 1], dtype=torch.uint8)
    data.write_idx(tmp_path / f"i{suffix}", images)
    data.write_idx(tmp_path / f"l{suffix}", labels)
    assert torch.equal(data.read_idx(tmp_path / f"i{suffix}"), images)
    x, y = data.read_split(tmp_path / f"i{suffix}", tmp_path / f"l{suffix}")
    assert torch.equal(x, images) and x.dtype == torch.uint8
    assert torch.equal(y, labels.long()) and y.dtype == torch.int64
    raw = (tmp_path / f"i{suffix}").read_bytes()
    assert (gzip.decompress(raw) if suffix else raw) == idx_bytes(images)
    assert leftovers(tmp_path) == []


def test_read_idx_sniffs_gzip_whatever_the_name(tmp_path: Path) -> None:
    labels = torch.arange(10, dtype=torch.uint8)
    (tmp_path / "labels").write_bytes(gzip.compress(idx_bytes(labels)))
    assert torch.equal(data.read_labels(tmp_path / "labels"), labels)


def test_empty_idx_round_trip(tmp_path: Path) -> None:
    empty = torch.empty(0, 28, 28, dtype=torch.uint8)
    data.write_idx(tmp_path / "e", empty)
    assert data.read_images(tmp_path / "e").shape == (0, 28, 28)


def _labels(n: int = 4) -> bytes:
    return idx_bytes(torch.zeros(n, dtype=torch.uint8))


CORRUPTIONS = {
    "bad magic": (b"\x01\x00" + _labels()[2:], "magic"),
    "wrong dtype code": (b"\x00\x00\x0d\x01" + _labels()[4:], "data type code 0x0d"),
    "no dimensions": (b"\x00\x00\x08\x00", "0 dimensions"),
    "truncated header": (_labels()[:6], "truncated header"),
    "short payload": (_labels()[:-1], "short payload"),
    "trailing bytes": (_labels() + b"\x00", "trailing"),
}


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_idx_raises_idx_error(tmp_path: Path, case: str, compressed: bool) -> None:
    content, problem = CORRUPTIONS[case]
    path = tmp_path / "corrupt-labels"
    path.write_bytes(gzip.compress(content) if compressed else content)
    with pytest.raises(IDXError, match=problem) as err:
        data.read_labels(path)
    assert str(path) in str(err.value)


def test_wrong_ndim_rejected(tmp_path: Path) -> None:
    (tmp_path / "labels").write_bytes(_labels())
    with pytest.raises(IDXError, match="1 dimensions, expected 3"):
        data.read_images(tmp_path / "labels")


def test_images_must_be_28x28(tmp_path: Path) -> None:
    (tmp_path / "i").write_bytes(idx_bytes(torch.zeros(2, 28, 27, dtype=torch.uint8)))
    with pytest.raises(IDXError, match="expected 28x28"):
        data.read_images(tmp_path / "i")


def test_label_out_of_range(tmp_path: Path) -> None:
    (tmp_path / "l").write_bytes(idx_bytes(torch.tensor([1, 2, 10, 3], dtype=torch.uint8)))
    with pytest.raises(IDXError, match=r"label 10 at index 2 is out of range 0\.\.9"):
        data.read_labels(tmp_path / "l")


def test_image_and_label_counts_must_agree(tmp_path: Path) -> None:
    (tmp_path / "i").write_bytes(idx_bytes(torch.zeros(3, 28, 28, dtype=torch.uint8)))
    (tmp_path / "l").write_bytes(_labels(4))
    with pytest.raises(IDXError, match=r"3 images but .* has 4 labels"):
        data.read_split(tmp_path / "i", tmp_path / "l")


def test_missing_file_is_idx_error(tmp_path: Path) -> None:
    with pytest.raises(IDXError, match="no such file"):
        data.read_idx(tmp_path / "nope")


def test_corrupt_gzip_stream_is_idx_error(tmp_path: Path) -> None:
    packed = bytearray(gzip.compress(_labels(1000)))
    packed[-8] ^= 0xFF  # break the CRC
    (tmp_path / "l.gz").write_bytes(bytes(packed))
    with pytest.raises(IDXError, match="corrupt gzip"):
        data.read_labels(tmp_path / "l.gz")


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "gz"])
def test_absurd_header_refused_before_allocating(tmp_path: Path, compressed: bool) -> None:
    # 4e9 images of 28x28: ~3e12 bytes claimed by a 16-byte header.
    header = b"\x00\x00\x08\x03" + struct.pack(">3I", 4_000_000_000, 28, 28)
    path = tmp_path / "huge"
    path.write_bytes(gzip.compress(header) if compressed else header)
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(IDXError, match="claims"):
        data.read_images(path)
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 5 and peak < 1 << 20  # time only guards against a hang


def test_size_limit_refuses_plausible_but_large_claims(tmp_path: Path) -> None:
    (tmp_path / "i").write_bytes(idx_bytes(torch.zeros(100, 28, 28, dtype=torch.uint8)))
    with pytest.raises(IDXError, match="over 1000"):
        data.read_idx(tmp_path / "i", max_bytes=1000)


def test_gzip_bomb_stops_one_byte_past_the_claim(tmp_path: Path) -> None:
    # A header claiming 10 images followed by 64 MB of zeros (about 64 KB compressed).
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [z.compress(idx_bytes(torch.zeros(10, 28, 28, dtype=torch.uint8)))]
    zeros = bytes(1 << 20)
    parts += [z.compress(zeros) for _ in range(64)]
    (tmp_path / "bomb.gz").write_bytes(b"".join([*parts, z.flush()]))
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(IDXError, match="trailing bytes"):
        data.read_images(tmp_path / "bomb.gz")
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 5 and peak < 4 << 20  # time only guards against a hang


def test_write_idx_refuses_non_uint8(tmp_path: Path) -> None:
    with pytest.raises(IDXError, match="uint8"):
        data.write_idx(tmp_path / "f", torch.zeros(3))
