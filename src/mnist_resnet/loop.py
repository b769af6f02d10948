"""The trainer as state plus loop: `TrainState` (what survives a restart) and `train_one_epoch`.

`train.py` runs one of these per epoch with its checkpoints, signals and logs as hooks; the
degradation study runs the same loop with hooks of its own (timm's `train_one_epoch`, nanoGPT's
one state dict). A reader's walk from `mnist-resnet train` to one optimizer step:
`train.train` → `_Trainer.run` → `train_one_epoch` → `step` (augment, then `step.train_step`).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mnist_resnet.errors import TrainingError
from mnist_resnet.optim import WeightAverage
from mnist_resnet.step import NonFiniteLoss

# One step of a training batch (uint8 images, labels) → (loss, error rate, whether the optimizer
# stepped), both still on the device; False for a non-finite step skipped by the caller.
Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, bool]]


@dataclass
class EpochProgress:
    """How far the current epoch got: what a mid-epoch checkpoint needs to continue it bit for
    bit (its sums so far, and the augmentation stream's state)."""

    step: int = 0
    loss_sum: float = 0.0
    err_sum: float = 0.0
    seen: int = 0
    seconds: float = 0.0
    augment_rng: torch.Tensor | None = None


@dataclass
class TrainState:
    """Everything a run needs to continue after a restart, and nothing else: the plain module
    (never a DDP or compiled wrapper), optimizer, schedule, weight average, whole epochs done,
    the current epoch's progress and the global RNG states."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    average: WeightAverage | None = None
    epoch: int = 0
    progress: EpochProgress = field(default_factory=EpochProgress)

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint keys this state owns (the same keys checkpoints have always had)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "weight_average": None if self.average is None else self.average.state_dict(),
            "epoch": self.epoch,
            "partial_epoch": dict(vars(self.progress)) if self.progress.step else None,
            "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])},
        }

    def load_state_dict(self, state: dict[str, Any], *, rank: int = 0) -> None:
        """Restore from a checkpoint; `rank` picks this process's share of a mid-epoch one."""
        self.epoch = int(state["epoch"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.average is not None:
            if state.get("weight_average") is None:
                raise TrainingError("this checkpoint holds no weight average to resume --ema-decay")
            self.average.load_state_dict(state["weight_average"])
        partial = state.get("partial_epoch")
        self.progress = EpochProgress()
        if partial:
            # Each rank continues its own shard and its own augmentation stream.
            per_rank = state.get("partial_epoch_ranks") or [partial]
            self.progress = EpochProgress(**per_rank[rank])
        if "rng" in state:  # the degradation study's checkpoints before this module had none
            torch.set_rng_state(state["rng"]["torch"])
            random.setstate((3, tuple(int(v) for v in state["rng"]["python"]), None))


@dataclass(frozen=True)
class Hooks:
    """Where `train_one_epoch` hands control back: its logging, checkpoint and signal points."""

    # Read the losses back every `log_every` steps (a device sync) and pass them to `on_log`
    # as (step, loss, error rate) rows.
    log_every: int = 1
    on_log: Callable[[list[tuple[int, float, float]]], None] = lambda rows: None
    # Called before each step with its number (1-based), e.g. to arm a gradient probe.
    before_step: Callable[[int], None] = lambda step: None
    # Save the state mid-epoch every `checkpoint_every` steps (0: never), and when `stop_now`
    # says so; then `on_stop` ends the run (it raises).
    checkpoint_every: int = 0
    on_checkpoint: Callable[[], None] = lambda: None
    stop_now: Callable[[int], bool] = lambda step: False
    on_stop: Callable[[], None] = lambda: None


def train_one_epoch(
    state: TrainState,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    step: Step,
    steps: int,
    hooks: Hooks,
) -> EpochProgress:
    """Train one epoch, or the rest of one after a resume, up to `steps` steps; return its sums
    and leave `state.progress` empty for the next. A non-finite loss raises `NonFiniteLoss`
    naming its step (at once, or at the next read when the step does not check)."""
    p, unread = state.progress, _Unread()
    start = time.perf_counter() - p.seconds
    for images_u8, labels in batches:
        if p.step >= steps:
            break
        hooks.before_step(p.step + 1)
        try:
            loss, err, stepped = step(images_u8, labels)  # augment, forward, backward, update
        except NonFiniteLoss as e:
            raise NonFiniteLoss(e.value, step=p.step + 1) from None
        if stepped and state.average is not None:
            state.average.update()
        state.scheduler.step()
        p.step += 1
        p.seen += len(labels)
        unread.add(p.step, loss, err, len(labels))
        if p.step % hooks.log_every == 0:  # logging point
            hooks.on_log(unread.read(p))
        stop = hooks.stop_now(p.step)  # signal point
        due = hooks.checkpoint_every and p.step % hooks.checkpoint_every == 0
        if (stop or due) and p.step < steps:  # checkpoint point (the epoch's own comes after)
            unread.read(p)  # the saved sums are complete, and no bad step is saved
            p.seconds = time.perf_counter() - start
            hooks.on_checkpoint()
            if stop:
                hooks.on_stop()
    hooks.on_log(unread.read(p))  # also waits for the device: the epoch's time is real time
    p.seconds = time.perf_counter() - start
    state.progress = EpochProgress()
    return p


class _Unread:
    """(step, loss, error rate, batch size) of the steps whose values are still on the device:
    read back in one transfer and added to the epoch's sums in step order, so the sums equal
    those of a read per step."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, torch.Tensor, torch.Tensor, int]] = []

    def add(self, step: int, loss: torch.Tensor, err: torch.Tensor, n: int) -> None:
        self.steps.append((step, loss, err, n))

    def read(self, p: EpochProgress) -> list[tuple[int, float, float]]:
        if not self.steps:
            return []
        values = torch.stack([v for _, loss, err, _ in self.steps for v in (loss, err)]).tolist()
        rows = []
        for i, (step, _, _, n) in enumerate(self.steps):
            loss, err = values[2 * i], values[2 * i + 1]
            if not math.isfinite(loss):
                # Only without the per-step check: the weights took the bad step, but nothing
                # is saved before this read.
                self.steps = []
                raise NonFiniteLoss(loss, step=step)
            p.loss_sum += loss * n
            p.err_sum += err * n
            rows.append((step, loss, err))
        self.steps = []
        return rows
