"""The optimizer and what steers it: parameter groups, the learning-rate schedule, and the
exponential moving average of the weights."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from mnist_resnet.config import TrainConfig
from mnist_resnet.settings import ConfigError


def param_groups(
    model: nn.Module, weight_decay: float, *, leave_out: list[torch.Tensor] | None = None
) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only; BN parameters and biases are not decayed.
    `leave_out`: parameters another optimizer steps (Muon's)."""
    skip = {id(p) for p in leave_out or []}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def peak_lr(cfg: TrainConfig, world_size: int = 1) -> float:
    """`--lr` times the number of processes for SGD (Muon's SGD part included): the global batch
    is `batch_size` x world size, and the linear scaling rule (Goyal et al. 2017, with the warmup
    we already use) keeps the step per image unchanged. Adadelta adapts its own step size and is
    left alone."""
    return cfg.lr * world_size if cfg.optimizer in ("sgd", "muon") else cfg.lr


def group_peak_lr(group: dict[str, Any], cfg: TrainConfig, world_size: int = 1) -> float:
    """The peak rate of one parameter group: `--muon-lr` for the group Muon steps (its update
    has a set size whatever the batch, so it does not scale with the processes), else `peak_lr`."""
    return cfg.muon_lr if group.get("muon") else peak_lr(cfg, world_size)


def make_optimizer(
    model: nn.Module, cfg: TrainConfig, world_size: int = 1
) -> torch.optim.Optimizer:
    lr = peak_lr(cfg, world_size)
    if cfg.optimizer == "adadelta":
        return torch.optim.Adadelta(param_groups(model, cfg.weight_decay), lr=lr)
    if cfg.optimizer == "muon":
        return MuonSGD(model, cfg, world_size)
    groups = param_groups(model, cfg.weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def hidden_conv_weights(model: nn.Module) -> list[torch.Tensor]:
    """The conv weights of the residual stages: what Muon is for. The stem conv (which sees
    pixels, not features), the classifier, BN parameters and biases are left to SGD, as the
    Muon authors advise for the first and last layers."""
    stages = getattr(model, "stages", None)
    modules = [m for s in stages for m in s.modules()] if stages else list(model.modules())[1:]
    convs = [m.weight for m in modules if isinstance(m, nn.Conv2d) and m.weight.requires_grad]
    # Without stages (another network), every conv but the first, the stem, counts as hidden.
    return convs if stages else convs[1:]


def _last(weight: torch.Tensor) -> bool:
    """Whether `weight`'s matrix takes its columns in channels_last order (kh, kw, in)."""
    return not weight.is_contiguous()


def _as_matrix(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A conv weight or gradient (out, in, kh, kw) as an out x (in*kh*kw) matrix, its columns in
    the order of the weight's memory (in, kh, kw for NCHW; kh, kw, in for channels_last), so
    that for the weight itself the matrix is a view of its storage."""
    if channels_last:
        t = t.permute(0, 2, 3, 1)
    return t.reshape(t.shape[0], -1)


class MuonSGD(torch.optim.SGD):
    """Muon on the conv weights of the residual stages, Nesterov SGD on everything else.

    Muon (Keller Jordan's optimizer, as torch.optim.Muon) replaces each weight matrix's momentum
    update by its nearest semi-orthogonal matrix, so every direction of the matrix moves by about
    the same amount; on our short schedules that fits MNIST in fewer epochs than SGD
    (docs/results.md). torch's Muon steps 2-D parameters only: it steps out x (in*kh*kw) views
    that share each conv weight's storage, so the network keeps its own parameters, layout and
    state dict. Its group sits last in `param_groups` (flagged "muon", peak rate `--muon-lr`),
    so the schedule sets its rate like any other group's; `step` hands that group's gradients to
    the views.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, world_size: int = 1) -> None:
        hidden = hidden_conv_weights(model)
        if not hidden:
            raise ConfigError(
                "--optimizer muon needs conv layers after the stem; this model has none"
            )
        groups = param_groups(model, cfg.weight_decay, leave_out=hidden)
        groups.append({"params": hidden, "lr": cfg.muon_lr, "weight_decay": 0.0, "muon": True})
        super().__init__(
            groups, lr=peak_lr(cfg, world_size), momentum=cfg.momentum, nesterov=cfg.nesterov
        )
        # NCHW-contiguous weights view as (out, in*kh*kw) directly; others (channels_last)
        # after moving the channels last. 1x1 kernels are both and read the same either way.
        self._matrices = [nn.Parameter(_as_matrix(p.detach(), _last(p))) for p in hidden]
        for p, m in zip(hidden, self._matrices, strict=True):
            if m.data_ptr() != p.data_ptr() or m.numel() != p.numel():
                raise RuntimeError("a conv weight's memory layout gives no matrix view of it")
        self._muon = torch.optim.Muon(
            self._matrices,
            lr=cfg.muon_lr,
            weight_decay=0.0,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
        )

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[-1]
        for p, m in zip(group["params"], self._matrices, strict=True):
            if m.data_ptr() != p.data_ptr():
                # A module.to() that re-lays out the weights would leave Muon stepping copies.
                raise RuntimeError("a conv weight moved after its optimizer was made")
            m.grad = None if p.grad is None else _as_matrix(p.grad, _last(p))
            p.grad = None  # SGD skips a parameter without a gradient
        self._muon.param_groups[0]["lr"] = group["lr"]
        self._muon.step()  # type: ignore[no-untyped-call]
        super().step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["muon"] = self._muon.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        if "muon" not in state:
            raise ValueError("this optimizer state holds no Muon part")
        self._muon.load_state_dict(state.pop("muon"))
        super().load_state_dict(state)


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
