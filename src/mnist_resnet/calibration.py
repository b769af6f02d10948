"""Probabilities that mean what they say: temperature scaling and the measures of calibration.

A network trained with label smoothing (every preset here) is under-confident: the shipped MNIST
model gives a clear digit about 91%. Temperature scaling (Guo et al. 2017, "On Calibration of
Modern Neural Networks") divides the logits by one number T, fitted after training on the
validation split by negative log-likelihood; the ranking of the classes, and so the accuracy, is
unchanged.

One number cannot fix a model that is over-confident on close calls and under-confident on clear
ones (the Fashion-MNIST model after temperature scaling: docs/calibration.md). So each image gets
its own temperature, a power of its margin (top logit minus the runner-up):
T(z) = T0 * margin(z) ** b. It is still one positive number per image, so the ranking, and the
accuracy, stay as they were; b = 0 is plain temperature scaling, and a checkpoint calibrated
before b existed loads with b = 0. This is the smallest case of parameterized temperature
scaling (Tomani et al. 2022, a temperature predicted from the sorted logits), with two
parameters instead of a network, so 5,000 validation images fit it without over-fitting.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# 15 equal-width confidence bins, as in Guo et al. and most papers since.
ECE_BINS = 15
# The fitted temperature must lie in this range; outside it the search failed or the logits
# carry no information, and a stored value outside it marks a damaged file.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0
# The margin power b is searched in this range and a stored one outside it is refused: at
# |b| = 1 the temperature already follows the margin one to one.
MAX_MARGIN_POWER = 1.0
# Margins below this count as this: a tie between two classes would otherwise give log(0).
MIN_MARGIN = 1e-3


class CalibrationError(ValueError):
    """Stored calibration data is missing parts or out of range."""


@dataclass(frozen=True)
class Calibration:
    """How the logits are turned into probabilities: softmax(logits / T(logits)), with
    T = temperature * margin ** margin_power per image."""

    temperature: float = 1.0
    margin_power: float = 0.0
    method: str = "none"
    fitted_on: str = ""
    # Negative log-likelihood on the images it was fitted on, before and after.
    nll_before: float | None = None
    nll_after: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "margin_power": self.margin_power,
            "method": self.method,
            "fitted_on": self.fitted_on,
            "nll_before": self.nll_before,
            "nll_after": self.nll_after,
        }

    def apply(self, logits: Tensor) -> Tensor:
        """The calibrated class probabilities of `logits` (N, C)."""
        return calibrated(logits, self.temperature, self.margin_power)

    def describe(self) -> str:
        """The formula in a few characters, for reports: "T = 0.52" or "T = 0.71 * m^-0.05"."""
        if self.margin_power == 0.0:
            return f"T = {self.temperature:.4f}"
        return f"T = {self.temperature:.4f} * margin^{self.margin_power:+.4f}"

    @classmethod
    def from_dict(cls, raw: object) -> Calibration:
        if not isinstance(raw, dict):
            raise CalibrationError(f"expected a mapping, got {type(raw).__name__}")
        t = raw.get("temperature")
        if not isinstance(t, int | float) or not MIN_TEMPERATURE <= t <= MAX_TEMPERATURE:
            raise CalibrationError(f"temperature {t!r} is not a number in 0.05..20")
        b = raw.get("margin_power", 0.0)
        if not isinstance(b, int | float) or not abs(b) <= MAX_MARGIN_POWER:
            raise CalibrationError(f"margin_power {b!r} is not a number in -1..1")
        nll = [raw.get(k) for k in ("nll_before", "nll_after")]
        return cls(
            temperature=float(t),
            margin_power=float(b),
            method=str(raw.get("method", "temperature scaling"))[:100],
            fitted_on=str(raw.get("fitted_on", ""))[:200],
            nll_before=float(nll[0]) if isinstance(nll[0], int | float) else None,
            nll_after=float(nll[1]) if isinstance(nll[1], int | float) else None,
        )


def log_margin(logits: Tensor) -> Tensor:
    """log(top logit - runner-up) of each row of `logits` (N, C), as an (N, 1) column."""
    if logits.shape[1] < 2:
        return torch.zeros_like(logits[:, :1])
    top2 = logits.topk(2, dim=1).values
    return (top2[:, :1] - top2[:, 1:]).clamp_min(MIN_MARGIN).log()


def calibrated(logits: Tensor, temperature: float, margin_power: float = 0.0) -> Tensor:
    """Class probabilities of `logits` (N, C): softmax(logits / T), T = temperature *
    margin ** margin_power per row. Plain torch, so traced and exported graphs compute it."""
    logits = logits.double() if logits.dtype == torch.float64 else logits.float()
    if margin_power == 0.0:
        return (logits / temperature).softmax(dim=1)
    scale = torch.exp(math.log(temperature) + margin_power * log_margin(logits))
    return (logits / scale).softmax(dim=1)


def _golden_min(f: Callable[[float], float], lo: float, hi: float, tol: float) -> float:
    """Where the unimodal `f` is least on [lo, hi]; deterministic, no learning rate."""
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = f(a), f(b)
    while hi - lo > tol:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = f(b)
    return (lo + hi) / 2


def fit_temperature(logits: Tensor, labels: Tensor, margin_power: float = 0.0) -> float:
    """The T0 > 0 minimising the mean negative log-likelihood at `margin_power`.

    The NLL is convex in 1/T, so a golden-section search over log T finds its minimum; unlike
    LBFGS it needs no learning rate and gives the same answer on every machine.
    """
    logits, labels = logits.double(), labels.long()
    spread = margin_power * log_margin(logits)

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / torch.exp(log_t + spread), labels))

    lo, hi = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    return math.exp(_golden_min(nll, lo, hi, 1e-6))


def fit_margin(logits: Tensor, labels: Tensor) -> tuple[float, float]:
    """(T0, b) minimising the NLL: a golden-section search over b, each b with its best T0."""
    logits, labels = logits.double(), labels.long()

    def nll(b: float) -> float:
        t = fit_temperature(logits, labels, b)
        return negative_log_likelihood(calibrated(logits, t, b), labels)

    b = _golden_min(nll, -MAX_MARGIN_POWER, MAX_MARGIN_POWER, 1e-4)
    return fit_temperature(logits, labels, b), b


def fit(logits: Tensor, labels: Tensor, fitted_on: str) -> Calibration:
    """Margin temperature scaling fitted on (`logits`, `labels`), with the NLL it moved from
    and to."""
    t, b = fit_margin(logits, labels)
    return Calibration(
        temperature=t,
        margin_power=b,
        method="margin temperature scaling",
        fitted_on=fitted_on,
        nll_before=negative_log_likelihood(logits.softmax(1), labels),
        nll_after=negative_log_likelihood(calibrated(logits, t, b), labels),
    )


# ----------------------------------------------------------------------------- measures


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = ECE_BINS) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by their share
    of the images (Naeini et al. 2015); confidence is the top class's probability."""
    table = reliability(probs, labels, bins)
    total = sum(n for _, _, n in table)
    return sum(n * abs(acc - conf) for conf, acc, n in table) / max(1, total)


def reliability(
    probs: Tensor, labels: Tensor, bins: int = ECE_BINS
) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, count) of each non-empty bin; bin i holds confidences in
    (i/bins, (i+1)/bins]."""
    confidence, predicted = probs.double().max(dim=1)
    correct = (predicted == labels.long()).double()
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1
    table = []
    for i in range(bins):
        inside = index == i
        n = int(inside.sum())
        if n:
            table.append((float(confidence[inside].mean()), float(correct[inside].mean()), n))
    return table


def negative_log_likelihood(probs: Tensor, labels: Tensor) -> float:
    picked = probs.double().gather(1, labels.long().unsqueeze(1)).squeeze(1)
    return float(-picked.clamp_min(1e-12).log().mean())


def brier_score(probs: Tensor, labels: Tensor) -> float:
    """Mean squared distance between the probabilities and the one-hot label (sum over classes)."""
    one_hot = F.one_hot(labels.long(), probs.shape[1]).double()
    return float(((probs.double() - one_hot) ** 2).sum(dim=1).mean())


@dataclass(frozen=True)
class Measures:
    accuracy: float
    ece: float
    nll: float
    brier: float

    @classmethod
    def of(cls, probs: Tensor, labels: Tensor) -> Measures:
        return cls(
            accuracy=float((probs.argmax(1) == labels.long()).double().mean()),
            ece=expected_calibration_error(probs, labels),
            nll=negative_log_likelihood(probs, labels),
            brier=brier_score(probs, labels),
        )

    def as_dict(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "ece": self.ece, "nll": self.nll, "brier": self.brier}
