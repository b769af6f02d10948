"""Ensembles and test-time augmentation: average the softmax outputs of several views/models.

Both are judged on any split: `--split validation` re-creates each checkpoint's own held-out
images from its saved split seed, so whether to ensemble or to use test-time shifts can be
decided without looking at the test set.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mnist_resnet import data
from mnist_resnet.checkpoint import CheckpointError, LoadedModel, load_model
from mnist_resnet.config import ConfigError, TrainConfig
from mnist_resnet.evaluate import predict_logits
from mnist_resnet.runtime import Runtime, make_runtime

Log = Callable[[str], None]
SPLITS = ("test", "validation")

# Test-time views: the image itself and one-pixel shifts in the four directions. Training
# already shifts digits by up to 2 pixels, so these are views the network knows.
TTA_SHIFTS: tuple[tuple[int, int], ...] = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))


def shift_images(images_u8: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate (N, H, W) uint8 images by (dy, dx) pixels, filling with 0 (the background)."""
    if dy == 0 and dx == 0:
        return images_u8
    h, w = images_u8.shape[-2:]
    padded = F.pad(images_u8, (abs(dx), abs(dx), abs(dy), abs(dy)))
    top, left = abs(dy) - dy, abs(dx) - dx
    return padded[..., top : top + h, left : left + w]


def predict_proba(
    member: LoadedModel,
    images_u8: torch.Tensor,
    runtime: Runtime,
    *,
    tta: bool = False,
    batch_size: int = TrainConfig.test_batch_size,
) -> torch.Tensor:
    """Softmax probabilities (N, classes) of one model, averaged over the TTA views if asked."""
    model = runtime.prepare_model(member.model)
    views = TTA_SHIFTS if tta else TTA_SHIFTS[:1]
    total = torch.zeros(())
    for dy, dx in views:
        logits = predict_logits(
            model,
            shift_images(images_u8, dy, dx),
            mean=member.mean,
            std=member.std,
            runtime=runtime,
            batch_size=batch_size,
        )
        total = total + logits.softmax(dim=1)
    return total / len(views)


@dataclass(frozen=True)
class EnsembleResult:
    dataset: str
    split: str
    tta: bool
    members: tuple[tuple[str, float], ...]  # (checkpoint, accuracy on its own)
    accuracy: float
    loss: float
    count: int

    def as_dict(self) -> dict[str, object]:
        return {
            "dataset": self.dataset,
            "split": self.split,
            "tta": self.tta,
            "members": [{"checkpoint": p, "accuracy": a} for p, a in self.members],
            "accuracy": self.accuracy,
            "loss": self.loss,
            "count": self.count,
        }


def _split_images(
    member: LoadedModel, splits: data.Splits, split: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if split == "test":
        return splits.test_images, splits.test_labels
    cfg = member.data_config
    if cfg.val_size == 0:
        raise ConfigError(
            "--split validation: this checkpoint was trained without a validation split"
        )
    _, _, val_x, val_y = data.split_validation(
        splits.train_images, splits.train_labels, cfg.val_size, cfg.split_seed
    )
    return val_x, val_y


def ensemble(
    checkpoints: Sequence[Path],
    *,
    data_dir: Path,
    split: str = "test",
    tta: bool = False,
    batch_size: int = TrainConfig.test_batch_size,
    accel: bool = True,
    log: Log = print,
) -> EnsembleResult:
    """Average the softmax outputs of `checkpoints` (each over its TTA views) on one split."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose test or validation")
    if len({p.resolve() for p in checkpoints}) != len(checkpoints):
        raise ConfigError("the same checkpoint is listed twice; an ensemble needs distinct models")
    members = [load_model(p) for p in checkpoints]
    first = members[0]
    for path, m in zip(checkpoints, members, strict=True):
        if m.data_config.dataset != first.data_config.dataset:
            raise CheckpointError(
                f"{path} was trained on {m.data_config.dataset}, {checkpoints[0]} on "
                f"{first.data_config.dataset}; ensemble members must share a dataset"
            )
        if split == "validation" and (
            (m.data_config.val_size, m.data_config.split_seed)
            != (first.data_config.val_size, first.data_config.split_seed)
        ):
            raise CheckpointError(
                f"{path} holds out a different validation split than {checkpoints[0]}; "
                "compare them on --split test or retrain with the same --val-size/--split-seed"
            )
    splits = data.load(first.data_config.dataset, data_dir, log=log)
    images, labels = _split_images(first, splits, split)
    labels = labels.long()
    runtime = make_runtime(accel=accel, amp=True, channels_last=True)
    summed = torch.zeros(len(labels), len(first.class_names))
    scores = []
    for path, m in zip(checkpoints, members, strict=True):
        proba = predict_proba(m, images, runtime, tta=tta, batch_size=batch_size)
        if proba.shape != summed.shape:
            raise CheckpointError(
                f"{path} predicts {proba.shape[1]} classes, not {summed.shape[1]}"
            )
        acc = float((proba.argmax(1) == labels).float().mean())
        log(f"  {path}: {acc:.2%}")
        scores.append((str(path), acc))
        summed += proba
    mean_proba = summed / len(members)
    return EnsembleResult(
        dataset=first.data_config.dataset,
        split=split,
        tta=tta,
        members=tuple(scores),
        accuracy=float((mean_proba.argmax(1) == labels).float().mean()),
        loss=float(F.nll_loss(mean_proba.clamp_min(1e-12).log(), labels)),
        count=len(labels),
    )


def write_json(result: EnsembleResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
