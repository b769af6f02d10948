"""Experiments that reproduce figures of the ResNet paper (He et al. 2015).

The configs live here, apart from the torch code in the submodules, so the command line can make
their flags (settings.py) without importing torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mnist_resnet.config import DATASET_NAMES, ConfigError, TrainConfig, blocks_per_stage
from mnist_resnet.settings import Settings, setting

KINDS = ("plain", "residual")


@dataclass(frozen=True)
class DegradationConfig(Settings):
    """Everything that defines the experiment's numbers; stored in `experiment.json`."""

    dataset: str = setting("fashion-mnist", "dataset", choices=DATASET_NAMES)
    depths: tuple[int, ...] = setting((8, 20, 56), "depths 6n+2 to compare", metavar="DEPTH")
    epochs: int = setting(3, "epochs per net", low=1)
    # Three seeds by default: the figure's bands and the table's ± say how much of a gap is
    # the seed's (docs/degradation.md; the default scale runs in under 30 minutes on 2 cores).
    seeds: int = setting(3, "seeds 1..K per net", low=1)
    # The first N images of the training split (after the 5,000-image validation hold-out).
    train_images: int = setting(10_000, "training images used")
    # The first N images of the validation split, evaluated `val_points` times per epoch.
    val_images: int = setting(2_000, "validation images", low=1)
    val_points: int = setting(4, low=1)
    # "Final train error": the first N training images in eval mode, no augmentation.
    train_eval_images: int = setting(5_000, low=1)
    # The first N test images (0: all of them); fewer only to keep tests fast.
    test_images: int = setting(0, "test images, 0 for all", low=0)
    # One recipe for every kind and depth: SGD + Nesterov, warmup then cosine (the project's
    # one-cycle schedule), no augmentation and no label smoothing, so training error measures
    # optimisation alone, as in the paper.
    batch_size: int = setting(128, "batch size", low=1)
    lr: float = setting(0.1, "peak learning rate, the same for every net", above=0.0)
    momentum: float = setting(0.9, low=0.0, below=1.0)
    weight_decay: float = setting(1e-4, low=0.0)
    warmup_epochs: float = setting(0.5, low=0.0)
    # Per-stage gradient norms are read every `grad_every` iterations (cheap hooks).
    grad_every: int = setting(5, low=1)

    def validate(self) -> None:
        super().validate()
        if not self.depths:
            raise ConfigError("--depths needs at least one depth")
        for depth in self.depths:
            blocks_per_stage(depth, "plain")
        if len(set(self.depths)) != len(self.depths):
            raise ConfigError(f"--depths repeats a depth: {list(self.depths)}")
        if self.train_images < self.batch_size:
            raise ConfigError(
                f"--train-images ({self.train_images}) must be at least one batch "
                f"(--batch-size {self.batch_size})"
            )

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            label_smoothing=0.0,
            warmup_epochs=self.warmup_epochs,
            seed=seed,
        )

    def to_json(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["depths"] = list(self.depths)
        return values

    def recipe(self) -> dict[str, Any]:
        """What a member's numbers depend on besides (kind, depth, seed): must match to reuse.

        Depths and seeds are left out, so adding a depth or a seed reuses the runs already made.
        """
        values = self.to_json()
        del values["depths"], values["seeds"]
        return values
