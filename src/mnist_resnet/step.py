"""The one training step: the only place that applies autocast, the channels_last layout and the
optimizer step, and that checks a loss for NaN/inf before it can touch the weights.

Training, the degradation experiment, the precision probe and the benchmarks all step through
`train_step`, so what they time and what they train is the same arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mnist_resnet.runtime import Runtime


@dataclass(frozen=True)
class Distillation:
    """A teacher whose softened probabilities the step also learns from (`distill.Teacher`):
    the loss is (1 - weight) * cross-entropy + weight * T^2 * KL(teacher || student at T)."""

    teacher: nn.Module
    weight: float
    temperature: float


class NonFiniteLoss(ArithmeticError):
    """A loss of NaN or inf; `step` is the epoch's step (1-based) once the loop knows it."""

    def __init__(self, value: float, *, step: int = 0) -> None:
        super().__init__(f"non-finite loss {value}")
        self.value = value
        self.step = step


def distillation_loss(
    logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(teacher || student) at temperature T, times T^2 so that its gradients keep their size
    as T changes (Hinton et al. 2015); in fp32, like the cross-entropy beside it."""
    log_student = F.log_softmax(logits.float() / temperature, dim=1)
    kl = F.kl_div(log_student, teacher_probs, reduction="batchmean")
    return kl * temperature**2


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    runtime: Runtime,
    *,
    label_smoothing: float = 0.0,
    grad_clip: float = 0.0,
    check_finite: bool = True,
    distill: Distillation | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a normalised float batch; returns (loss, error rate), detached.

    The only place that applies autocast, the channels_last layout and the optimizer step.
    With `check_finite` it raises `NonFiniteLoss`, leaving weights and optimizer untouched, when
    the loss is NaN/inf; that check waits for the device. Without it nothing in the step waits
    for the device, and the caller checks the returned loss before it trusts the weights.
    """
    images = runtime.prepare_input(images)
    labels = labels.to(runtime.device, non_blocking=True)
    with runtime.autocast():
        logits = model(images)
    # The loss in fp32: bf16 log-softmax loses the small differences label smoothing makes.
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    if distill is not None:
        # The teacher sees the same augmented batch, in the same precision and layout.
        with torch.no_grad(), runtime.autocast():
            targets = distill.teacher(images)
        soft = distillation_loss(logits, targets, distill.temperature)
        loss = (1.0 - distill.weight) * loss + distill.weight * soft
    # Checked before backward: a NaN step would poison the weights and the momentum buffers.
    if check_finite and not torch.isfinite(loss):
        raise NonFiniteLoss(float(loss.detach()))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach(), (logits.detach().argmax(1) != labels).float().mean()
