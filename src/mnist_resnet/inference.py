"""From uint8 pixels to logits: the normalisation and the batched forward pass every model user
(evaluate, predict, serve, export, ensemble) shares. Depends on torch alone, not on the data layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mnist_resnet.config import TrainConfig
from mnist_resnet.runtime import Runtime


def to_float(images_u8: Tensor, mean: float, std: float) -> Tensor:
    """uint8 pixels to float32 standardised with the dataset's training mean/std."""
    return images_u8.float().mul_(1.0 / (255.0 * std)).sub_(mean / std)


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    images_u8: Tensor,
    *,
    mean: float,
    std: float,
    runtime: Runtime,
    batch_size: int = TrainConfig.test_batch_size,
) -> Tensor:
    """fp32 logits on the CPU for uint8 images (N, 28, 28) or (N, 1, 28, 28), in large eval
    batches. Images already on the runtime's device (training's device-resident splits) are
    standardised there; the logits stay on the device until the last batch, so a GPU runs the
    whole split without waiting for the host in between.
    """
    model.eval()
    if images_u8.ndim == 3:
        images_u8 = images_u8.unsqueeze(1)
    outputs = []
    for start in range(0, len(images_u8), batch_size):
        x = runtime.prepare_input(to_float(images_u8[start : start + batch_size], mean, std))
        with runtime.autocast():
            outputs.append(model(x).float())
    if not outputs:
        return torch.empty(0, 0)
    return torch.cat(outputs).cpu()
