"""torch.hub entries of mnist-resnet (docs/models.md#torchhub).

    model = torch.hub.load("OWNER/mnist-resnet", "mnist")          # the network, pretrained
    clf = torch.hub.load("OWNER/mnist-resnet", "classifier", "mnist")  # with predict()
    net = torch.hub.load("OWNER/mnist-resnet", "resnet", preset="best", num_classes=26)

As torchvision's entries do, `mnist` and `fashion_mnist` return the `nn.Module` in eval mode
(batch norms kept, so it can be fine-tuned): it takes float32 (N, 1, 28, 28) images, white on
black, scaled as `(x / 255 - mean) / std` with the model's own constants (0.1307, 0.3081 for
MNIST) and returns logits (for a model of several networks, the log of their mean
probability). `classifier` returns `mnist_resnet.Classifier`, which prepares any picture and
answers with calibrated probabilities.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from mnist_resnet.predict import Classifier

# What torch.hub checks before it imports this file (the package's own core dependencies).
dependencies = ["torch", "numpy", "PIL", "scipy", "safetensors"]

if importlib.util.find_spec("mnist_resnet") is None:
    # A bare checkout, as torch.hub downloads it: its own sources (else the installed package).
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))


def _shipped(name: str, pretrained: bool) -> nn.Module:
    from mnist_resnet import pretrained as shipped
    from mnist_resnet.checkpoint import load_model
    from mnist_resnet.model import build_model

    loaded = load_model(shipped.weights_path(name), fold=False)
    return loaded.model if pretrained else build_model(loaded.model_config)


def mnist(pretrained: bool = True) -> nn.Module:
    """The shipped MNIST model, a width-2 ResNet-14 (docs/models.md#mnist; float32 parameters,
    from the float16 file); untrained with `pretrained=False`."""
    return _shipped("mnist", pretrained)


def fashion_mnist(pretrained: bool = True) -> nn.Module:
    """The shipped Fashion-MNIST model, two width-2 ResNet-14s averaged in one module
    (docs/models.md#fashion-mnist; float32 parameters, from the int8 file); untrained with
    `pretrained=False`."""
    return _shipped("fashion-mnist", pretrained)


def classifier(model: str = "mnist", device: str = "cpu") -> Classifier:
    """`mnist_resnet.load(model)`: a shipped model's name or a checkpoint file, with
    `predict(images)`, `prepare(image)` and `model`."""
    from mnist_resnet.predict import load

    return load(model, device=device)


def resnet(preset: str = "default", **overrides: Any) -> nn.Module:
    """An untrained network of any preset (`mnist-resnet summary` lists them), with ModelConfig
    fields overridden, e.g. `resnet("best", num_classes=26)`."""
    from mnist_resnet.config import ConfigError
    from mnist_resnet.config import preset as chosen
    from mnist_resnet.model import build_model, check_size

    config = chosen(preset).model
    unknown = set(overrides) - {f.name for f in dataclasses.fields(config)}
    if unknown:
        raise ConfigError(f"unknown model settings {sorted(unknown)}; see ModelConfig")
    config = dataclasses.replace(config, **overrides)
    config.validate()
    check_size(config)
    return build_model(config)
