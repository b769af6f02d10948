""" "This is not a digit": a score of how unlike the training images an input is, and its cut-off.

The score (benchmarks/ood.py compares it with maximum softmax, energy and plain Mahalanobis;
docs/calibration.md has the numbers): the features of two layers, average-pooled (the
penultimate 64 and layer2's 32 channels of a ResNet), each with its Mahalanobis distance to the
nearest class mean under a covariance shared by the classes (Lee et al. 2018), fitted on the
training split; a logistic regression on those features and the two log distances separates the
training digits from synthetic outliers (strokes, scribbles, noise, blobs) and from letters
rendered in the fonts matplotlib ships (outlier exposure, Hendrycks et al. 2019, on a linear
head: the network's weights stay as trained). The cut-off flags `FLAG_RATE` of the validation
images. Letters that people write like digits (O, l, Z, S, ...: `DIGIT_LIKE`) are left out of
the outliers: calling them digits is not a mistake.

Everything here is torch code, so the exported ONNX / TorchScript graph computes the same score.
"""

from __future__ import annotations

import base64
import binascii
import string
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor, nn

from mnist_resnet.calibration import Calibration
from mnist_resnet.model import given_view

# The validation images flagged at the cut-off: below the 1% asked for, so that the test set,
# a different sample, stays under 1% too (docs/calibration.md).
FLAG_RATE = 0.008
# Below this calibrated top probability the answer is "not sure": the model itself says it is
# wrong at least one time in five on such inputs.
UNSURE_BELOW = 0.8
# Letters commonly written or read as digits (after Unicode's confusables: O/o/D/Q as 0,
# I/l/i/j as 1, Z/z as 2, A as 4, S/s as 5, G/b as 6, T as 7, B as 8, g/q as 9).
DIGIT_LIKE = frozenset("OoDQIlijZzASsGbTBgq")
VERDICTS = ("sure", "unsure", "out_of_distribution")
# Ridge on the logistic head's weights, and the covariance shrinkage (share of its mean variance).
HEAD_L2 = 1e-3
SHRINK = 1e-6


class DetectorError(ValueError):
    """Stored detector data is missing parts or has the wrong shapes."""


def taps(model: nn.Module) -> tuple[str, ...]:
    """The modules whose pooled outputs are the features: a middle layer and the penultimate."""
    names = {name for name, _ in model.named_modules()}
    for pair in (("layer2", "avgpool"), ("conv2", "fc1")):
        if set(pair) <= names:
            return pair
    raise DetectorError("no known feature layers in this model")


@contextmanager
def tapped(model: nn.Module, names: Sequence[str], pool: bool = True) -> Iterator[list[Tensor]]:
    """While open, each forward of `model` leaves the outputs of `names` in the list, pooled
    over space (or, with `pool=False`, whole and detached)."""
    found: list[Tensor] = []
    modules = dict(model.named_modules())
    handles = []
    for name in names:

        def keep(_: nn.Module, __: Any, out: Tensor) -> None:
            out = given_view(model, out)
            if not pool:
                found.append(out.detach())
            else:
                found.append(out.mean(dim=(2, 3)) if out.ndim == 4 else out.flatten(1))

        handles.append(modules[name].register_forward_hook(keep))
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


class Detector(nn.Module):
    """Features of the tapped layers → out-of-distribution score (higher: less like training)."""

    def __init__(self, tensors: dict[str, Tensor], threshold: float, taps: Sequence[str]) -> None:
        super().__init__()
        self.taps = tuple(taps)
        self.threshold = float(threshold)
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor.float().clone())
        self._check()

    def _check(self) -> None:
        total = 0
        for i in range(len(self.taps)):
            means, precision = self.buffer(f"means{i}"), self.buffer(f"precision{i}")
            d = means.shape[1]
            if means.ndim != 2 or precision.shape != (d, d):
                raise DetectorError(f"tap {i}: means {means.shape}, precision {precision.shape}")
            total += d + 1
        for name in ("center", "scale", "weight"):
            if self.buffer(name).shape != (total,):
                raise DetectorError(f"{name} has shape {tuple(self.buffer(name).shape)}")
        if not all(torch.isfinite(t).all() for t in self.buffers()):
            raise DetectorError("not all values are finite")

    def buffer(self, name: str) -> Tensor:
        value = getattr(self, name, None)
        if not isinstance(value, Tensor):
            raise DetectorError(f"missing {name}")
        return value

    def head_inputs(self, features: Sequence[Tensor]) -> Tensor:
        parts = list(features)
        for i, f in enumerate(features):
            parts.append(mahalanobis(f, self.buffer(f"means{i}"), self.buffer(f"precision{i}")))
        return torch.cat(parts, dim=1)

    def forward(self, features: list[Tensor]) -> Tensor:
        z = (self.head_inputs(features) - self.buffer("center")) / self.buffer("scale")
        return z @ self.buffer("weight") + self.buffer("bias")

    def as_dict(self) -> dict[str, Any]:
        return {
            "taps": list(self.taps),
            "threshold": self.threshold,
            "tensors": {k: v.clone() for k, v in self.named_buffers()},
        }

    @classmethod
    def from_dict(cls, raw: object) -> Detector:
        if not isinstance(raw, dict):
            raise DetectorError(f"expected a mapping, got {type(raw).__name__}")
        tensors, names, threshold = raw.get("tensors"), raw.get("taps"), raw.get("threshold")
        if not isinstance(tensors, dict) or not isinstance(names, list | tuple):
            raise DetectorError("tensors or taps missing")
        if not isinstance(threshold, int | float) or not np.isfinite(threshold):
            raise DetectorError(f"threshold {threshold!r} is not a number")
        try:
            as_tensors = {str(k): decode_tensor(v) for k, v in tensors.items()}
        except (TypeError, ValueError, RuntimeError, binascii.Error) as e:
            raise DetectorError(f"tensors unreadable: {e}") from None
        return cls(as_tensors, float(threshold), [str(n) for n in names])


def encode_tensor(tensor: Tensor) -> dict[str, Any]:
    """A float32 tensor as JSON: its shape and its little-endian bytes in base64."""
    raw = tensor.detach().float().contiguous().numpy().astype("<f4").tobytes()
    return {"shape": list(tensor.shape), "float32_base64": base64.b64encode(raw).decode()}


def decode_tensor(value: object) -> Tensor:
    """`encode_tensor`'s output (or nested lists of numbers) as a float32 tensor."""
    if isinstance(value, dict):
        shape = value.get("shape")
        if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise ValueError(f"bad shape {shape!r}")
        raw = base64.b64decode(str(value.get("float32_base64", "")), validate=True)
        array = np.frombuffer(raw, dtype="<f4")
        if array.size != int(np.prod(shape)):
            raise ValueError(f"{array.size} values for shape {shape}")
        return torch.from_numpy(array.astype(np.float32).reshape(shape))
    return torch.as_tensor(value, dtype=torch.float32)


def mahalanobis(features: Tensor, means: Tensor, precision: Tensor) -> Tensor:
    """log of the squared Mahalanobis distance to the nearest class mean, (N, 1)."""
    d = features.unsqueeze(1) - means.unsqueeze(0)  # (N, C, D)
    squared = ((d @ precision) * d).sum(dim=2)
    return torch.log(squared.min(dim=1, keepdim=True).values + 1e-6)


class Scored(nn.Module):
    """A network with its calibration and detector: image → (logits, probabilities, ood score).

    What serving and export run; without a detector the score is 0 and nothing is flagged.
    """

    def __init__(self, net: nn.Module, calibration: Calibration, detector: Detector | None) -> None:
        super().__init__()
        self.net = net
        self.calibration = calibration
        self.detector = detector
        self._features: list[Tensor] = []
        # The hooks stay on `net`, which others may run too (export times the bare network):
        # they keep features only during this module's own forward.
        self._active = False
        if detector is not None:
            modules = dict(net.named_modules())
            for name in detector.taps:
                modules[name].register_forward_hook(self._keep)

    def _keep(self, _: nn.Module, __: Any, out: Tensor) -> None:
        if self._active:
            out = given_view(self.net, out)
            self._features.append(out.mean(dim=(2, 3)) if out.ndim == 4 else out.flatten(1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self._features.clear()
        self._active = True
        try:
            logits = self.net(x)
        finally:
            self._active = False
        probabilities = self.calibration.apply(logits)
        if self.detector is None:
            score = torch.zeros_like(logits[:, 0])
        else:
            score = self.detector(self._features)
        self._features.clear()
        return logits, probabilities, score

    @property
    def threshold(self) -> float:
        return self.detector.threshold if self.detector is not None else float("inf")


def verdict(top_probability: float, score: float, threshold: float) -> str:
    """ "out_of_distribution" past the cut-off, "unsure" below UNSURE_BELOW, else "sure"."""
    if score > threshold:
        return "out_of_distribution"
    return "unsure" if top_probability < UNSURE_BELOW else "sure"


# ----------------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class Fitted:
    calibration: Calibration
    detector: Detector


def class_gaussians(features: Tensor, labels: Tensor, classes: int) -> tuple[Tensor, Tensor]:
    """Class means (C, D) and the precision (D, D) of their shared covariance, in float64."""
    f = features.double()
    means = torch.stack([f[labels == c].mean(0) for c in range(classes)])
    centred = f - means[labels]
    cov = centred.T @ centred / len(f)
    cov = cov + SHRINK * cov.diagonal().mean() * torch.eye(len(cov), dtype=torch.float64)
    return means, torch.linalg.inv(cov)


def logistic_head(inside: Tensor, outside: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(center, scale, weight, bias) of a ridge logistic regression: outside 1, inside 0, both
    sets weighted equally; LBFGS in float64 from zero, deterministic."""
    center = inside.mean(0)
    scale = inside.std(0) + 1e-6
    x = (torch.cat([inside, outside]) - center) / scale
    y = torch.cat([torch.zeros(len(inside)), torch.ones(len(outside))]).double()
    weights = torch.where(y == 1, len(inside) / len(outside), 1.0)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = (weights * F.binary_cross_entropy_with_logits(x @ w + b, y, reduction="none")).mean()
        loss = loss + HEAD_L2 * (w**2).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    with torch.enable_grad():
        opt.step(closure)  # type: ignore[no-untyped-call]
    return center, scale, w.detach(), b.detach().reshape(1)


def fit_detector(
    features: dict[str, list[Tensor]], train_labels: Tensor, names: Sequence[str], classes: int
) -> Detector:
    """Fit on the tapped features of `train` (with labels), `outliers` and `validation`."""
    tensors: dict[str, Tensor] = {}
    for i in range(len(names)):
        means, precision = class_gaussians(features["train"][i], train_labels, classes)
        tensors[f"means{i}"], tensors[f"precision{i}"] = means, precision
    partial = Detector(
        {**tensors, **_dummy_head(features["train"])}, threshold=0.0, taps=names
    ).double()
    with torch.no_grad():
        inside = partial.head_inputs([f.double() for f in features["train"]])
        outside = partial.head_inputs([f.double() for f in features["outliers"]])
    center, scale, weight, bias = logistic_head(inside, outside)
    tensors.update(center=center, scale=scale, weight=weight, bias=bias)
    detector = Detector(tensors, threshold=0.0, taps=names)
    with torch.no_grad():
        val_scores = detector(features["validation"])
    detector.threshold = float(torch.quantile(val_scores.double(), 1 - FLAG_RATE))
    return detector


def _dummy_head(features: list[Tensor]) -> dict[str, Tensor]:
    total = sum(f.shape[1] + 1 for f in features)
    return {
        "center": torch.zeros(total),
        "scale": torch.ones(total),
        "weight": torch.zeros(total),
        "bias": torch.zeros(1),
    }


# ----------------------------------------------------------------------------- outliers


def fit_fonts() -> list[Path]:
    """The DejaVu fonts matplotlib ships (always installed with it): the letters the detector
    is fitted on. The benchmark judges it on letters in other fonts (Liberation)."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return sorted(p for p in folder.glob("DejaVu*.ttf"))


def render_text(text: str, font: Path, *, size: int = 64, angle: float = 0.0) -> NDArray[np.uint8]:
    """`text` in `font`, white on black, prepared as `predict` prepares an image (MNIST-style)."""
    from PIL import Image, ImageDraw, ImageFont

    from mnist_resnet.images import prepare_image

    canvas = Image.new("L", (size * 2, size * 2), 0)
    ImageDraw.Draw(canvas).text(
        (size // 2, size // 3), text, fill=255, font=ImageFont.truetype(str(font), size)
    )
    if angle:
        canvas = canvas.rotate(angle, resample=Image.Resampling.BILINEAR)
    return prepare_image(canvas, "mnist")


def rendered(
    chars: str, fonts: Sequence[Path], angles: Sequence[float] = (-10.0, 0.0, 10.0)
) -> tuple[NDArray[np.uint8], list[str]]:
    """Each character in each font at each angle, as (N, 28, 28) images and their characters."""
    from mnist_resnet.images import ImageError

    images, shown = [], []
    for font in fonts:
        for ch in chars:
            for angle in angles:
                try:
                    images.append(render_text(ch, font, angle=angle))
                except ImageError:  # a font without the glyph draws nothing
                    continue
                shown.append(ch)
    return np.stack(images), shown


def outlier_letters() -> str:
    return "".join(c for c in string.ascii_letters if c not in DIGIT_LIKE)


def synthetic(count: int, seed: int) -> NDArray[np.uint8]:
    """Scribbles, noise, blobs and hatching, prepared MNIST-style: inputs that are no digit."""
    from PIL import Image, ImageDraw

    from mnist_resnet.images import ImageError, prepare_image

    rng = np.random.default_rng(seed)
    out: list[NDArray[np.uint8]] = []
    while len(out) < count:
        kind = len(out) % 4
        img = Image.new("L", (112, 112), 0)
        draw = ImageDraw.Draw(img)
        if kind == 0:  # one long random polyline
            points = [tuple(rng.uniform(10, 102, 2)) for _ in range(int(rng.integers(4, 12)))]
            draw.line(points, fill=255, width=int(rng.integers(5, 12)), joint="curve")
        elif kind == 1:  # salt noise of random density
            dots = rng.random((112, 112)) < rng.uniform(0.05, 0.5)
            img = Image.fromarray((dots * 255).astype(np.uint8))
        elif kind == 2:  # filled ellipses and rectangles
            for _ in range(int(rng.integers(2, 6))):
                x, y = rng.uniform(5, 100, 2)
                w, h = rng.uniform(8, 40, 2)
                shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
                shape([x, y, x + w, y + h], fill=255)
        else:  # short strokes in all directions
            for _ in range(int(rng.integers(3, 9))):
                x, y = rng.uniform(10, 100, 2)
                dx, dy = rng.uniform(-30, 30, 2)
                draw.line([(x, y), (x + dx, y + dy)], fill=255, width=int(rng.integers(4, 10)))
        try:
            out.append(prepare_image(img, "mnist"))
        except ImageError:
            continue
    return np.stack(out)


def fit_outliers(seed: int = 0) -> NDArray[np.uint8]:
    """What the detector is fitted to reject: synthetic inputs and letters in matplotlib's fonts."""
    letters, _ = rendered(outlier_letters(), fit_fonts())
    return np.concatenate([synthetic(3000, seed), letters])
