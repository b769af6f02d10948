"""The one training step: the only place that applies autocast, the channels_last layout and the
optimizer step, and that checks a loss for NaN/inf before it can touch the weights.

Training, the degradation experiment, the precision probe and the benchmarks all step through
`train_step`, so what they time and what they train is the same arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mnist_resnet.runtime import Runtime


class NonFiniteLoss(ArithmeticError):
    """A loss of NaN or inf; `step` is the epoch's step (1-based) once the loop knows it."""

    def __init__(self, value: float, *, step: int = 0) -> None:
        super().__init__(f"non-finite loss {value}")
        self.value = value
        self.step = step


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
    # Checked before backward: a NaN step would poison the weights and the momentum buffers.
    if check_finite and not torch.isfinite(loss):
        raise NonFiniteLoss(float(loss.detach()))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach(), (logits.detach().argmax(1) != labels).float().mean()
