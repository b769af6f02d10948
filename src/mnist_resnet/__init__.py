"""ResNet classifiers for MNIST-style 28x28 images: data, models, training, evaluation.

From Python (README, "Use from Python"):

    clf = mnist_resnet.load("mnist")       # or "fashion-mnist", or a checkpoint file
    clf.predict("digit.png").label         # paths, PIL images, numpy arrays, uint8 tensors

Importing the package stays light: torch and the model code load with the first `load`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from mnist_resnet.predict import Classifier, Prediction

__version__ = "0.1.0"
__all__ = ["Classifier", "Prediction", "load"]


def load(
    model: str | os.PathLike[str] = "mnist", *, device: str | torch.device = "cpu"
) -> Classifier:
    """A shipped model by name (`"mnist"`, `"fashion-mnist"`) or a checkpoint file (`.pt` or
    `.safetensors`), checked and ready: `clf.predict(image)`, `clf.prepare(image)`, `clf.model`.

    Raises a `UserError` (one line: what is wrong, what to do) for an unknown name or a missing,
    damaged or edited file."""
    from mnist_resnet.predict import load as load_classifier

    return load_classifier(model, device=device)


def __getattr__(name: str) -> Any:
    # The result types, imported when first named (they need torch).
    if name in ("Classifier", "Prediction"):
        from mnist_resnet import predict

        return getattr(predict, name)
    raise AttributeError(f"module 'mnist_resnet' has no attribute {name!r}")
