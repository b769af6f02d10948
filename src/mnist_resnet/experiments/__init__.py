"""Experiments that reproduce figures of the ResNet paper (He et al. 2015).

The configs live here, apart from the torch code in the submodules, so the command line can read
their defaults without importing torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from mnist_resnet.config import DATASET_NAMES, ConfigError, TrainConfig, blocks_per_stage

KINDS = ("plain", "residual")


@dataclass(frozen=True)
class DegradationConfig:
    """Everything that defines the experiment's numbers; stored in `experiment.json`."""

    dataset: str = "fashion-mnist"
    depths: tuple[int, ...] = (8, 20, 56)
    epochs: int = 3
    # Three seeds by default: the figure's bands and the table's ± say how much of a gap is
    # the seed's (docs/degradation.md; the default scale runs in under 30 minutes on 2 cores).
    seeds: int = 3
    # The first N images of the training split (after the 5,000-image validation hold-out).
    train_images: int = 10_000
    # The first N images of the validation split, evaluated `val_points` times per epoch.
    val_images: int = 2_000
    val_points: int = 4
    # "Final train error": the first N training images in eval mode, no augmentation.
    train_eval_images: int = 5_000
    # The first N test images (0: all of them); fewer only to keep tests fast.
    test_images: int = 0
    # One recipe for every kind and depth: SGD + Nesterov, warmup then cosine (the project's
    # one-cycle schedule), no augmentation and no label smoothing, so training error measures
    # optimisation alone, as in the paper.
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    # Per-stage gradient norms are read every `grad_every` iterations (cheap hooks).
    grad_every: int = 5

    def validate(self) -> None:
        if self.dataset not in DATASET_NAMES:
            raise ConfigError(
                f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASET_NAMES)}"
            )
        if not self.depths:
            raise ConfigError("--depths needs at least one depth")
        for depth in self.depths:
            blocks_per_stage(depth, "plain")
        if len(set(self.depths)) != len(self.depths):
            raise ConfigError(f"--depths repeats a depth: {list(self.depths)}")
        if self.epochs < 1 or self.seeds < 1:
            raise ConfigError("--epochs and --seeds must be >= 1")
        if self.train_images < self.batch_size or self.batch_size < 1:
            raise ConfigError(
                f"--train-images ({self.train_images}) must be at least one batch "
                f"(--batch-size {self.batch_size})"
            )
        if self.val_images < 1 or self.val_points < 1 or self.train_eval_images < 1:
            raise ConfigError("--val-images, val_points and train_eval_images must be >= 1")
        if self.test_images < 0:
            raise ConfigError(f"--test-images must be >= 0 (0: all), got {self.test_images}")
        if not 0 < self.lr < math.inf or self.grad_every < 1:
            raise ConfigError(f"--lr must be positive and finite (got {self.lr}), grad_every >= 1")
        finite = (self.momentum, self.weight_decay, self.warmup_epochs)
        if not all(math.isfinite(v) and v >= 0 for v in finite) or self.momentum >= 1:
            raise ConfigError("momentum must be in [0, 1), weight decay and warmup finite and >= 0")

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
