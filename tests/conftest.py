"""Shared fixtures. Tests make their own small data; only `mnist_root` uses the real files."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from datafakes import ShapesRun, Tiny, make_tiny

from mnist_resnet.config import DATA_DIR_ENV

if TYPE_CHECKING:
    from mnist_resnet.evaluate import EvalResult

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST_ENV = "MNIST_RESNET_SHARED_MNIST"
MNIST_GZ = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def shared_mnist_dir() -> Path:
    # CI clones the repo into another folder with a copy of shared/ beside it.
    default = REPO.parent / "shared" / "data" / "mnist"
    return Path(os.environ.get(SHARED_MNIST_ENV) or default)


@pytest.fixture(scope="session", autouse=True)
def precision_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A cache folder of the session's own, so tests never write into the user's ~/.cache.

    The bf16 probe then runs once per test session (and so once per kernel set in .ci/run);
    subprocesses inherit the folder and read its verdict.
    """
    from mnist_resnet import precision

    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(precision.CACHE_ENV, str(folder))
        yield folder


# Set for the whole session, so every process a test starts (and theirs) inherits it: what
# tells this session's leftovers from other runs on the machine (test_reliability.py).
SESSION_ENV = "MNIST_RESNET_TEST_SESSION"


@pytest.fixture(scope="session", autouse=True)
def session_marker() -> Iterator[str]:
    marker = f"{os.getpid()}-{uuid.uuid4().hex}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(SESSION_ENV, marker)
        yield marker


def _fetch_into_cache() -> Path:
    """MNIST through the project's own data chain into the folder `make train` fills."""
    from mnist_resnet import data

    root = Path(os.environ.get(DATA_DIR_ENV) or REPO / "data")
    try:
        data.fetch("mnist", root, log=lambda _: None)
    except data.DataError as e:
        pytest.skip(
            f"real MNIST unavailable: no copy in {shared_mnist_dir()} and fetching into {root} "
            f"failed ({str(e).splitlines()[0]}); run `make train` once with network access, or "
            f"set ${SHARED_MNIST_ENV} to a folder holding the four MNIST .gz files"
        )
    return root


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding the real MNIST files in torchvision's layout.

    From the shared folder when it is there (symlinks, nothing copied); else fetched, verified
    and cached by the data layer exactly as `make train` does it.
    """
    shared = shared_mnist_dir()
    if not all((shared / name).is_file() for name in MNIST_GZ):
        return _fetch_into_cache()
    root = tmp_path_factory.mktemp("mnist-root")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_GZ:
        (raw / name).symlink_to(shared / name)
    return root


@pytest.fixture(scope="session")
def small_checkpoint(mnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of a pooled-stem ResNet-8 trained 2 epochs on 30% of real MNIST (~10 s).

    Strong enough that the tests judging predictions have room: 98.6-98.8% test accuracy and
    the same answer for all of the first 100 test digits before and after `predict`'s
    preprocessing, under every kernel set .ci/run tries (bf16 and fp32, AVX-512, AVX2, generic
    code, one thread). The ResNet-8 of one epoch on 20% used before reached only 93-94%.

    $MNIST_RESNET_TEST_CHECKPOINT names an existing checkpoint to use instead (quicker reruns).
    """
    given = os.environ.get("MNIST_RESNET_TEST_CHECKPOINT")
    if given:
        return Path(given)
    from mnist_resnet.config import DataConfig, ModelConfig, TrainConfig
    from mnist_resnet.train import train

    runs = tmp_path_factory.mktemp("small-runs")
    result = train(
        ModelConfig(depth=8, stem="pool"),
        TrainConfig(epochs=2, runs_dir=str(runs), name="small"),
        DataConfig(data_dir=str(mnist_root), subset=0.3),
        log=lambda _: None,
    )
    return Path(result.run_dir) / "best.pt"


@pytest.fixture(scope="session")
def evaluate_saved(mnist_root: Path) -> Callable[[Path], EvalResult]:
    """What `mnist-resnet evaluate` computes for a checkpoint: its folded model on the test set."""
    from mnist_resnet import data
    from mnist_resnet.checkpoint import load_model
    from mnist_resnet.evaluate import evaluate_loaded
    from mnist_resnet.precision import make_runtime

    splits = data.load("mnist", mnist_root, log=lambda _: None)

    def run(checkpoint: Path) -> EvalResult:
        loaded = load_model(checkpoint)
        # In the precision the run recorded, as `evaluate` does: probing again could choose
        # otherwise (another thread count, a loaded machine) and change the last digits.
        amp = loaded.state["config"]["train"].get("amp")
        runtime = make_runtime(accel=True, amp=amp, channels_last=True)
        return evaluate_loaded(loaded, splits.test_images, splits.test_labels, runtime)

    return run


@pytest.fixture
def tiny() -> Tiny:
    """A 12 + 6 image MNIST-layout dataset whose files the data tests serve and corrupt."""
    return make_tiny()


# A ResNet-8 for one epoch on 60 images of 24x24 pixels (about 5 s): the user's-folder tests
# check what flows where (class names, preprocessing, hashes), not how well it learns.
SHAPES_FLAGS = ("--depth", "8", "--epochs", "1", "--batch-size", "8", "--no-amp")


@pytest.fixture(scope="session")
def shapes_run(tmp_path_factory: pytest.TempPathFactory) -> ShapesRun:
    from datafakes import make_image_folder

    from mnist_resnet.cli import main

    base = tmp_path_factory.mktemp("shapes")
    folder = make_image_folder(base / "shapes", per_class=20)
    argv = ["train", "--dataset", f"folder:{folder}", *SHAPES_FLAGS]
    assert main([*argv, "--runs-dir", str(base / "runs"), "--name", "shapes"]) == 0
    return ShapesRun(folder, base / "runs" / "shapes", SHAPES_FLAGS)
