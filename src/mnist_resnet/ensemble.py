"""Ensembles and test-time augmentation: average the softmax outputs of several views/models.

Both are judged on any split: `--split validation` re-creates each checkpoint's own held-out
images from its saved split seed, so whether to ensemble or to use test-time shifts can be
decided without looking at the test set, and `select_members` picks which checkpoints to
average from the validation split alone. `pack` puts the chosen members into one model file
(`model.stack_members`) that predicts what their average predicts.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mnist_resnet import data
from mnist_resnet.checkpoint import (
    CheckpointError,
    LoadedModel,
    float_weights,
    load_model,
    save_checkpoint,
)
from mnist_resnet.config import ConfigError, EnsembleConfig, TrainConfig
from mnist_resnet.evaluate import evaluate
from mnist_resnet.files import hash_file, writable_file
from mnist_resnet.inference import predict_logits
from mnist_resnet.model import VIEWS, build_model, folded_copy, stack_members
from mnist_resnet.precision import make_runtime
from mnist_resnet.runtime import Runtime

Log = Callable[[str], None]
SPLITS = ("test", "validation")


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
    """Calibrated probabilities (N, classes) of one model, averaged over the TTA views if asked:
    one-pixel shifts, and for a model trained on mirrored images (`--flip`) their mirror images
    too."""
    model = runtime.prepare_model(member.model)
    # The model's own view sets, applied here to uint8 images with a zero fill. Training already
    # shifts digits by a pixel or two, so these are views the network knows. Only a model that
    # learned mirrored images knows them; for digits a mirror image is no view.
    views = (
        VIEWS["none"] if not tta else VIEWS["shift-flip" if member.data_config.flip else "shift"]
    )
    total = torch.zeros(())
    for dy, dx, mirrored in views:
        logits = predict_logits(
            model,
            shift_images(images_u8.flip(-1) if mirrored else images_u8, dy, dx),
            mean=member.mean,
            std=member.std,
            runtime=runtime,
            batch_size=batch_size,
        )
        # Each member's own calibration (docs/calibration.md): 1 for a file without one.
        total = total + member.calibration.apply(logits)
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


def _load_members(checkpoints: Sequence[Path], split: str) -> list[LoadedModel]:
    """Load the checkpoints and check they can be averaged on `split`."""
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
    return members


def _split_probas(
    checkpoints: Sequence[Path],
    *,
    split: str,
    data_dir: Path,
    tta: bool,
    batch_size: int,
    accel: bool,
    log: Log,
) -> tuple[LoadedModel, list[torch.Tensor], torch.Tensor]:
    """(first member, each member's softmax on `split`, that split's labels)."""
    members = _load_members(checkpoints, split)
    first = members[0]
    splits = data.load_data(dataclasses.replace(first.data_config, data_dir=str(data_dir)), log=log)
    images, labels = _split_images(first, splits, split)
    classes = len(first.class_names)
    probas = []
    for path, m in zip(checkpoints, members, strict=True):
        # Each member in the precision it trained and was judged in, as `evaluate` runs it:
        # one member alone then scores exactly what `evaluate` reports for it.
        runtime = make_runtime(accel=accel, amp=m.trained_amp, channels_last=True)
        proba = predict_proba(m, images, runtime, tta=tta, batch_size=batch_size)
        if proba.shape[1] != classes:
            raise CheckpointError(f"{path} predicts {proba.shape[1]} classes, not {classes}")
        probas.append(proba)
    return first, probas, labels.long()


def _nll(proba: torch.Tensor, labels: torch.Tensor) -> float:
    return float(F.nll_loss(proba.clamp_min(1e-12).log(), labels))


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
    first, probas, labels = _split_probas(
        checkpoints,
        split=split,
        data_dir=data_dir,
        tta=tta,
        batch_size=batch_size,
        accel=accel,
        log=log,
    )
    scores = []
    for path, proba in zip(checkpoints, probas, strict=True):
        acc = float((proba.argmax(1) == labels).float().mean())
        log(f"  {path}: {acc:.2%}")
        scores.append((str(path), acc))
    mean_proba = torch.stack(probas).mean(0)
    return EnsembleResult(
        dataset=first.data_config.dataset,
        split=split,
        tta=tta,
        members=tuple(scores),
        accuracy=float((mean_proba.argmax(1) == labels).float().mean()),
        loss=_nll(mean_proba, labels),
        count=len(labels),
    )


def select_members(
    checkpoints: Sequence[Path],
    *,
    data_dir: Path,
    max_members: int,
    tta: bool = False,
    batch_size: int = TrainConfig.test_batch_size,
    accel: bool = True,
    log: Log = print,
) -> list[Path]:
    """Choose up to `max_members` checkpoints on the validation split only.

    Greedy forward selection (Caruana et al. 2004): start from the checkpoint with the fewest
    validation errors, repeatedly add the one that leaves the averaged softmax with the fewest,
    up to `max_members`, then keep the prefix with the fewest errors (ties: the larger ensemble,
    whose average varies less). Equal error counts are broken by validation loss. The error
    count decides rather than the loss because label smoothing puts a floor under every
    model's loss (~0.10 on MNIST), and averaging two confident-but-not-sure models moves it by
    less than 0.001: the loss stopped this search at 2 of 11 models.
    """
    if max_members < 1:
        raise ConfigError(f"--select must be >= 1, got {max_members}")
    _, probas, labels = _split_probas(
        checkpoints,
        split="validation",
        data_dir=data_dir,
        tta=tta,
        batch_size=batch_size,
        accel=accel,
        log=log,
    )

    def score(total: torch.Tensor) -> tuple[int, float]:
        # (errors, loss) of the average of the softmax outputs summed in `total`
        errors = int((total.argmax(1) != labels).sum())
        return errors, _nll(total / total.sum(1, keepdim=True), labels)

    chosen: list[int] = []
    scores: list[tuple[int, float]] = []
    total = torch.zeros_like(probas[0])
    while len(chosen) < min(max_members, len(probas)):
        candidates = [i for i in range(len(probas)) if i not in chosen]
        pick = min(candidates, key=lambda i: (*score(total + probas[i]), i))
        chosen.append(pick)
        total += probas[pick]
        scores.append(score(total))
        errors, loss = scores[-1]
        log(
            f"  + {checkpoints[pick]}: {errors} validation errors ({errors / len(labels):.2%}), "
            f"loss {loss:.4f}, with {len(chosen)} model{'s' if len(chosen) > 1 else ''}"
        )
    keep = min(range(len(chosen)), key=lambda k: (scores[k][0], -k)) + 1
    log(f"  keeping the first {keep}: the fewest validation errors")
    return [checkpoints[i] for i in chosen[:keep]]


# What members must share to be one model: they read the same pictures the same way, name the
# same classes, and were judged on the same held-out images.
_SHARED = ("data_hashes", "normalization", "class_names")


def pack(
    checkpoints: Sequence[Path],
    out: Path,
    *,
    data_dir: Path,
    batch_size: int = TrainConfig.test_batch_size,
    accel: bool = True,
    log: Log = print,
) -> dict[str, Any]:
    """Write the checkpoints' ensemble as one model file at `out` and return its state.

    The members must be trained runs of one network shape on one dataset and validation split.
    The packed model is measured like a run's best.pt: its validation error and test accuracy in
    the precision its members trained in. Their calibrations, if any, are not carried over: the
    average is calibrated afresh (`mnist-resnet calibrate`, or `pretrained package`).
    """
    if len(checkpoints) < 2:
        raise ConfigError("--save: an ensemble needs at least two checkpoints")
    members = _load_members(checkpoints, "validation")
    first = members[0]
    shape = dataclasses.replace(first.model_config, tta="none")
    for path, m in zip(checkpoints, members, strict=True):
        if m.model_config.members != 1:
            raise CheckpointError(f"{path} is already an ensemble; give its members instead")
        if m.data_config.val_size == 0:
            raise CheckpointError(f"{path} held out no validation images to judge the ensemble")
        if dataclasses.replace(m.model_config, tta="none") != shape:
            raise CheckpointError(
                f"{path} is a different network from {checkpoints[0]}; members must share one"
            )
        for key in _SHARED:
            if m.state.get(key) != first.state.get(key):
                raise CheckpointError(
                    f"{path} differs from {checkpoints[0]} in its {key.replace('_', ' ')}"
                )
    model_cfg = dataclasses.replace(first.model_config, members=len(members))
    weights = stack_members(
        [float_weights(p, m.state["model"]) for p, m in zip(checkpoints, members, strict=True)]
    )
    model = build_model(model_cfg)
    model.load_state_dict(weights)
    model.eval()
    config = json.loads(json.dumps(first.state["config"]))
    config["model"] = dataclasses.asdict(model_cfg)
    state: dict[str, Any] = {
        "config": config,
        "model": weights,
        "epoch": max(int(m.state["epoch"]) for m in members),
        **{key: first.state[key] for key in _SHARED if key in first.state},
        "members": [_member_record(path, m) for path, m in zip(checkpoints, members, strict=True)],
    }
    splits = data.load_data(dataclasses.replace(first.data_config, data_dir=str(data_dir)), log=log)
    val_x, val_y = _split_images(first, splits, "validation")
    runtime = make_runtime(accel=accel, amp=first.trained_amp, channels_last=True)
    # Folded, as `load_model` gives it to `evaluate`: the file then scores what it reports.
    prepared = runtime.prepare_model(folded_copy(model))
    options: dict[str, Any] = {
        "mean": first.mean,
        "std": first.std,
        "runtime": runtime,
        "batch_size": batch_size,
    }
    val = evaluate(prepared, val_x, val_y, **options)
    test = evaluate(prepared, splits.test_images, splits.test_labels, **options)
    state["best"] = {"epoch": state["epoch"], "val_error": 1.0 - val.accuracy}
    state["test"] = {"accuracy": test.accuracy, "loss": test.loss}
    save_checkpoint(out, state)
    log(
        f"wrote {out}: one model averaging {len(members)} networks, validation error "
        f"{1.0 - val.accuracy:.2%}, test accuracy {test.accuracy:.2%}"
    )
    return state


def _member_record(path: Path, member: LoadedModel) -> dict[str, Any]:
    """What the packed file remembers of a member: where it came from and how it scored."""
    train = member.state["config"].get("train")
    seed = train.get("seed") if isinstance(train, dict) else None
    best, test = member.state.get("best"), member.state.get("test")
    return {
        "checkpoint": path.name if path.name != "best.pt" else f"{path.parent.name}/{path.name}",
        # Which file it was: a member retrained since is no longer this one.
        "sha256": hash_file(path),
        "seed": seed if isinstance(seed, int) else None,
        "epoch": int(member.state["epoch"]),
        "val_error": best.get("val_error") if isinstance(best, dict) else None,
        "test_accuracy": test.get("accuracy") if isinstance(test, dict) else None,
    }


def write_json(result: EnsembleResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.as_dict(), indent=2) + "\n")


def report(
    checkpoints: Sequence[Path],
    cfg: EnsembleConfig,
    *,
    data_dir: Path,
    batch_size: int = TrainConfig.test_batch_size,
    accel: bool = True,
    log: Log = print,
) -> EnsembleResult:
    """`mnist-resnet ensemble`: first choose up to `cfg.select` of the checkpoints on the
    validation split (0: take all), then report their ensemble on `cfg.split`."""
    cfg.validate()
    if cfg.json is not None:
        writable_file(cfg.json, "--json")
    if cfg.save is not None:
        writable_file(cfg.save, "--save")
    # The same data, views and batching for choosing the members and for reporting them.
    options: dict[str, Any] = {
        "data_dir": data_dir,
        "tta": cfg.tta,
        "batch_size": batch_size,
        "accel": accel,
        "log": log,
    }
    views = " with test-time shifts" if cfg.tta else ""
    if cfg.select:
        log(f"choosing up to {cfg.select} of {len(checkpoints)} models on the validation split:")
        checkpoints = select_members(checkpoints, max_members=cfg.select, **options)
    log(f"{cfg.split} accuracy of each model{views}:")
    result = ensemble(checkpoints, split=cfg.split, **options)
    if cfg.json is not None:
        write_json(result, cfg.json)
    if cfg.save is not None:
        pack(checkpoints, cfg.save, data_dir=data_dir, batch_size=batch_size, accel=accel, log=log)
    n = len(result.members)
    log(
        f"ensemble of {n} model{'s' if n > 1 else ''}{views} on {result.dataset} "
        f"{result.split} ({result.count} images): loss {result.loss:.4f}"
    )
    log(f"{result.split} accuracy: {result.accuracy:.2%}")
    return result
