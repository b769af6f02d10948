"""Shared fixtures. Tests make their own small data; only `mnist_root` uses the real files."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from mnist_resnet.evaluate import EvalResult

SHARED_MNIST_ENV = "MNIST_RESNET_SHARED_MNIST"
MNIST_GZ = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def shared_mnist_dir() -> Path:
    # CI clones the repo into another folder with a copy of shared/ beside it.
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
    return Path(os.environ.get(SHARED_MNIST_ENV) or default)


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding the real MNIST .gz files in torchvision's layout (symlinks)."""
    shared = shared_mnist_dir()
    missing = [name for name in MNIST_GZ if not (shared / name).is_file()]
    if missing:
        pytest.skip(f"real MNIST not found in {shared} (set ${SHARED_MNIST_ENV}): {missing}")
    root = tmp_path_factory.mktemp("mnist-root")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_GZ:
        (raw / name).symlink_to(shared / name)
    return root


@pytest.fixture(scope="session")
def small_checkpoint(mnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of a ResNet-8 trained one epoch on 20% of real MNIST (about 15 s, ~94%).

    $MNIST_RESNET_TEST_CHECKPOINT names an existing checkpoint to use instead (quicker reruns).
    """
    given = os.environ.get("MNIST_RESNET_TEST_CHECKPOINT")
    if given:
        return Path(given)
    from mnist_resnet.config import DataConfig, ModelConfig, TrainConfig
    from mnist_resnet.train import train

    runs = tmp_path_factory.mktemp("small-runs")
    result = train(
        ModelConfig(depth=8),
        TrainConfig(epochs=1, runs_dir=str(runs), name="small", threads=2),
        DataConfig(data_dir=str(mnist_root), subset=0.2),
        log=lambda _: None,
    )
    return Path(result.run_dir) / "best.pt"


@pytest.fixture(scope="session")
def evaluate_saved(mnist_root: Path) -> Callable[[Path], EvalResult]:
    """What `mnist-resnet evaluate` computes for a checkpoint: its folded model on the test set."""
    from mnist_resnet import data
    from mnist_resnet.checkpoint import load_model
    from mnist_resnet.evaluate import evaluate
    from mnist_resnet.runtime import make_runtime

    splits = data.load("mnist", mnist_root, log=lambda _: None)
    runtime = make_runtime(accel=False, amp=True, channels_last=True)

    def run(checkpoint: Path) -> EvalResult:
        loaded = load_model(checkpoint)
        return evaluate(
            runtime.prepare_model(loaded.model),
            splits.test_images,
            splits.test_labels,
            mean=loaded.mean,
            std=loaded.std,
            runtime=runtime,
        )

    return run
