"""The optimizer and what steers it: parameter groups, the learning-rate schedule, and the
exponential moving average of the weights."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from mnist_resnet.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only; BN parameters and biases are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def peak_lr(cfg: TrainConfig, world_size: int = 1) -> float:
    """`--lr` times the number of processes for SGD: the global batch is `batch_size` x world
    size, and the linear scaling rule (Goyal et al. 2017, with the warmup we already use) keeps
    the step per image unchanged. Adadelta adapts its own step size and is left alone."""
    return cfg.lr * world_size if cfg.optimizer == "sgd" else cfg.lr


def make_optimizer(
    model: nn.Module, cfg: TrainConfig, world_size: int = 1
) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    lr = peak_lr(cfg, world_size)
    if cfg.optimizer == "adadelta":
        return torch.optim.Adadelta(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def lr_factor(step: int, *, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Multiplier of the peak learning rate after `step` optimizer steps.

    onecycle: linear warmup from 0 over `warmup_epochs`, then cosine to 0 at the last step.
    step: StepLR(gamma=0.7) once per epoch, as in pytorch/examples.
    """
    if cfg.schedule == "step":
        return float(0.7 ** (step // steps_per_epoch))
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int, *, step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step schedule, set at `step` (from each group's "initial_lr" when step > 0)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, cfg=cfg, steps_per_epoch=steps_per_epoch),
        last_epoch=step - 1,
    )


class WeightAverage:
    """Exponential moving average of a model's weights and BatchNorm statistics.

    A separate copy of the model holds the average, so it can be evaluated as it is. Early
    updates use a smaller decay, min(decay, (1 + n) / (10 + n)), so the average does not
    remember the random initialisation for thousands of steps.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).requires_grad_(False)
        # state_dict() tensors share storage with the live parameters and buffers.
        pairs = list(
            zip(self.model.state_dict().values(), model.state_dict().values(), strict=True)
        )
        # Built once: update() runs after every optimizer step.
        self._averaged = [a for a, _ in pairs if a.is_floating_point()]
        self._live = [b for a, b in pairs if a.is_floating_point()]
        self._others = [(a, b) for a, b in pairs if not a.is_floating_point()]

    def decay_at(self, updates: int) -> float:
        """The decay the `updates`-th update uses."""
        return min(self.decay, (1 + updates) / (10 + updates))

    def steps_to_reach_decay(self) -> int:
        """The first update whose ramp (1+n)/(10+n) reaches the set decay: n >= (10d-1)/(1-d)."""
        n = max(1, math.floor((10 * self.decay - 1) / (1 - self.decay)) - 1)
        while self.decay_at(n) < self.decay:  # the float formula can be off by one either way
            n += 1
        return n

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = self.decay_at(self.updates)
        torch._foreach_lerp_(self._averaged, self._live, 1.0 - decay)
        for a, b in self._others:
            a.copy_(b)  # BatchNorm's num_batches_tracked: a counter, not an average

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
