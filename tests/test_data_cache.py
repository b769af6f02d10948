"""data.cache and data.splits: the verified cache, its size/mtime stamp, `verify`, `info`,
and the datasets in memory with their validation split."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from datafakes import (
    NAMES,
    Tiny,
    make_tiny,
    quiet,
)

from mnist_resnet import data
from mnist_resnet.data import (
    DATASETS,
    DataError,
    cache,
)

# ----------------------------------------------------------------------------- cache


def test_load_trusts_the_stamp_and_rechecks_changed_files(
    tmp_path: Path, tiny: Tiny, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = tiny.place(tmp_path / "Tiny" / "raw", compressed=True)
    data.fetch(tiny.spec, tmp_path, mirrors=[], system_dirs=[], log=quiet)
    hashed: list[Path] = []
    real_hash = cache.hash_file

    def counting_hash(path: Path, algo: str = "sha256") -> str:
        hashed.append(path)
        return real_hash(path, algo)

    monkeypatch.setattr(cache, "hash_file", counting_hash)
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


def test_splits_is_frozen(tmp_path: Path, tiny: Tiny) -> None:
    tiny.place(tmp_path / "Tiny" / "raw", compressed=False)
    splits = data.load(tiny.spec, tmp_path, download=False, log=quiet)
    with pytest.raises(dataclasses.FrozenInstanceError):
        splits.train_images = torch.zeros(1)  # type: ignore[misc]
