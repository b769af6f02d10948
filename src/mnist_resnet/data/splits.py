"""Datasets in memory: both splits loaded from the verified cache, the held-out validation split,
and `prepare_data`, which gives training exactly the tensors it needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mnist_resnet.config import DataConfig, own_data
from mnist_resnet.data.cache import read_stamp, stamp_matches, verify
from mnist_resnet.data.datasets import DatasetSpec, Log, get_spec, raw_dir
from mnist_resnet.data.errors import DataError
from mnist_resnet.data.idx import read_split
from mnist_resnet.data.own import load_own
from mnist_resnet.data.sources import fetch
from mnist_resnet.errors import printable

# Own data: the validation split takes at most this share of the training images, whatever
# --val-size says (its default, 5,000, is a twelfth of MNIST's training set).
OWN_VAL_SHARE = 10


@dataclass(frozen=True, eq=False)
class Splits:
    """A dataset in memory: images (N,28,28) uint8, labels (N,) int64."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    hashes: dict[str, str]  # file name (own data: "content") -> content SHA-256
    sources: dict[str, str]
    name: str
    classes: tuple[str, ...]
    # Normalisation: the dataset table's constants, or computed from own training images.
    mean: float
    std: float


def load(
    dataset: str | DatasetSpec, root: Path | str, *, log: Log = print, download: bool = True
) -> Splits:
    """Load both splits, fetching first unless the cache's size/mtime stamp still matches.

    The stamp in SOURCES.json is written only after a full hash check, so a file whose size
    and mtime are unchanged since then is trusted without re-hashing; anything else is
    re-verified (and re-fetched if needed) through `fetch`.
    """
    spec = get_spec(dataset)
    raw = raw_dir(root, spec)
    stamp = read_stamp(raw)
    if not stamp_matches(raw, spec, stamp):
        fetch(spec, root, log=log, download=download)
        stamp = read_stamp(raw)
    classes = len(spec.classes)
    train = read_split(raw / spec.train_images.name, raw / spec.train_labels.name, classes)
    test = read_split(raw / spec.test_images.name, raw / spec.test_labels.name, classes)
    return Splits(
        *train,
        *test,
        hashes={name: str(rec.get("sha256")) for name, rec in stamp.items()},
        sources={name: str(rec.get("source")) for name, rec in stamp.items()},
        name=spec.name,
        classes=spec.classes,
        mean=spec.mean,
        std=spec.std,
    )


def load_data(cfg: DataConfig, *, log: Log = print, download: bool = True) -> Splits:
    """The dataset `cfg` names, whether from the table (`load`) or a user's own images."""
    if own_data(cfg.dataset) is None:
        return load(cfg.dataset, Path(cfg.data_dir), log=log, download=download)
    own = load_own(
        cfg.dataset,
        preprocess=cfg.preprocess,
        test_fraction=cfg.test_fraction,
        seed=cfg.split_seed,
        log=log,
    )
    mean, std = _pixel_stats(own.train_images)
    if std < 1e-3:
        raise DataError(f"{cfg.dataset}: every training pixel has the same value; nothing to learn")
    return Splits(
        own.train_images,
        own.train_labels,
        own.test_images,
        own.test_labels,
        hashes={"content": own.content_hash()},
        sources={"content": cfg.dataset},
        name=cfg.dataset,
        classes=own.classes,
        mean=mean,
        std=std,
    )


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    raw_dir: Path
    classes: tuple[str, ...]
    train_class_counts: tuple[int, ...]
    test_class_counts: tuple[int, ...]
    pixel_mean: float  # training pixels scaled to [0, 1]
    pixel_std: float
    hashes: dict[str, str]
    sources: dict[str, str]

    @property
    def train_count(self) -> int:
        return sum(self.train_class_counts)

    @property
    def test_count(self) -> int:
        return sum(self.test_class_counts)


def _pixel_stats(images: Tensor) -> tuple[float, float]:
    # A 256-bin histogram gives the exact mean/std without a 376 MB float64 copy.
    hist = torch.bincount(images.flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255
    n = hist.sum()
    mean = (hist * values).sum() / n
    var = (hist * (values - mean) ** 2).sum() / n
    return float(mean), float(var.sqrt())


def info(dataset: str | DatasetSpec, root: Path | str, *, log: Log = print) -> DatasetInfo:
    """Counts, class balance, pixel statistics and provenance of a fetched dataset (or of a
    user's own images, read and checked as training would: `folder:PATH`, `npz:PATH`)."""
    if isinstance(dataset, str) and own_data(dataset) is not None:
        splits = load_data(DataConfig(dataset=dataset), log=log)
        where = Path(dataset.partition(":")[2])
    else:
        splits = load(dataset, root, log=log, download=False)
        where = raw_dir(root, dataset)
    classes = len(splits.classes)
    mean, std = _pixel_stats(splits.train_images)
    return DatasetInfo(
        name=splits.name,
        raw_dir=where,
        classes=splits.classes,
        train_class_counts=tuple(torch.bincount(splits.train_labels, minlength=classes).tolist()),
        test_class_counts=tuple(torch.bincount(splits.test_labels, minlength=classes).tolist()),
        pixel_mean=mean,
        pixel_std=std,
        hashes=splits.hashes,
        sources=splits.sources,
    )


def format_info(di: DatasetInfo) -> str:
    lines = [
        printable(f"{di.name}  ({di.raw_dir})"),
        f"  train {di.train_count} images, test {di.test_count} images, 28x28 uint8",
        f"  training pixels: mean {di.pixel_mean:.4f}, std {di.pixel_std:.4f}",
        "  class             train   test",
    ]
    for name, tr, te in zip(di.classes, di.train_class_counts, di.test_class_counts, strict=True):
        lines.append(f"    {printable(name):<14} {tr:>6} {te:>6}")  # own data: any name
    lines.append("  files:")
    for fname, sha in di.hashes.items():
        lines.append(f"    {fname}  sha256 {sha[:16]}…  from {di.sources.get(fname, '?')}")
    return "\n".join(lines)


def split_validation(
    images: Tensor, labels: Tensor, val_size: int, seed: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Hold out `val_size` random training examples (the same ones for the same seed)."""
    n = len(images)
    if not 0 <= val_size < n:
        raise DataError(f"validation size {val_size} must be between 0 and {n - 1}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    # Sorted, so both parts keep file order and their content depends only on the seed.
    val_idx = perm[:val_size].sort().values
    train_idx = perm[val_size:].sort().values
    return images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]


@dataclass(frozen=True)
class PreparedData:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: float
    std: float
    hashes: dict[str, str]
    class_names: tuple[str, ...]
    val_size: int  # images held out for validation (own data: --val-size capped, see below)


def validation_size(cfg: DataConfig, train_images: int) -> int:
    """--val-size, except that own data lends at most a tenth of its training images to it."""
    if own_data(cfg.dataset) is None:
        return cfg.val_size
    return min(cfg.val_size, train_images // OWN_VAL_SHARE)


def prepare_data(cfg: DataConfig, *, log: Log = print) -> PreparedData:
    """Load the dataset, carve the validation split, and optionally keep a subset.

    Training never trusts the cache's size/mtime stamp alone: every file is hashed again
    (a fraction of a second for MNIST), so a flipped bit is reported, not trained on. Own
    data is read and hashed whole each time.
    """
    splits = load_data(cfg, log=log)
    if own_data(cfg.dataset) is None:
        verify(cfg.dataset, Path(cfg.data_dir))
    val_size = validation_size(cfg, len(splits.train_images))
    if val_size != cfg.val_size:
        log(
            f"validation: {val_size} of the {len(splits.train_images)} training images (at most "
            f"a tenth of own data, whatever --val-size says)"
        )
    train_x, train_y, val_x, val_y = split_validation(
        splits.train_images, splits.train_labels, val_size, cfg.split_seed
    )
    if cfg.subset < 1.0:
        keep = max(1, int(len(train_x) * cfg.subset))
        train_x, train_y = train_x[:keep], train_y[:keep]
        keep_val = max(1, int(len(val_x) * cfg.subset)) if len(val_x) else 0
        val_x, val_y = val_x[:keep_val], val_y[:keep_val]
    return PreparedData(
        train_x=train_x,
        train_y=train_y,
        val_x=val_x,
        val_y=val_y,
        test_x=splits.test_images,
        test_y=splits.test_labels,
        mean=splits.mean,
        std=splits.std,
        hashes=dict(splits.hashes),
        class_names=splits.classes,
        val_size=val_size,
    )
