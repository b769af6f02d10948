"""Temperature scaling and the calibration measures, on cases whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from mnist_resnet.calibration import (
    Calibration,
    CalibrationError,
    Measures,
    brier_score,
    calibrated,
    expected_calibration_error,
    fit,
    fit_temperature,
    negative_log_likelihood,
    reliability,
)


def _sampled(
    temperature: float, n: int = 20_000, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits, and labels drawn from softmax(logits / temperature): the true temperature."""
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(n, 10, generator=g)
    labels = torch.multinomial((logits / temperature).softmax(1), 1, generator=g).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_with(true_t: float) -> None:
    logits, labels = _sampled(true_t)
    # 20,000 draws pin log T to about +-2% (its standard error here is under 1%).
    assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.05)


def test_fit_lowers_the_nll_and_keeps_the_ranking() -> None:
    logits, labels = _sampled(0.5)
    done = fit(logits, labels, "synthetic")
    assert done.nll_after is not None and done.nll_before is not None
    assert done.nll_after < done.nll_before
    assert torch.equal(calibrated(logits, done.temperature).argmax(1), logits.argmax(1))
    assert Calibration.from_dict(done.as_dict()) == done


def test_ece_brier_and_nll_of_known_cases() -> None:
    # Every answer 80% sure, 6 of 10 right: one bin, |0.6 - 0.8| = 0.2.
    probs = torch.tensor([[0.8, 0.2]] * 10)
    labels = torch.tensor([0] * 6 + [1] * 4)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.2)
    assert brier_score(probs, labels) == pytest.approx((6 * 0.08 + 4 * 1.28) / 10)
    assert negative_log_likelihood(probs, labels) == pytest.approx(
        -(6 * math.log(0.8) + 4 * math.log(0.2)) / 10
    )
    # Sure and right: nothing to correct.
    sure = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    right = torch.tensor([0, 1])
    assert expected_calibration_error(sure, right) == 0.0
    assert brier_score(sure, right) == 0.0
    # A confidence of exactly 1 lands in the last bin, 0.5 in the 8th of 15.
    assert [n for *_, n in reliability(sure, right)] == [2]
    m = Measures.of(probs, labels)
    assert (m.accuracy, m.ece) == (pytest.approx(0.6), pytest.approx(0.2))


def test_ece_is_small_for_probabilities_that_are_true() -> None:
    logits, labels = _sampled(1.0)
    assert expected_calibration_error(logits.softmax(1), labels) < 0.02
    assert expected_calibration_error((logits / 0.3).softmax(1), labels) > 0.1


@pytest.mark.parametrize(
    "raw", [None, {}, {"temperature": 0.0}, {"temperature": float("nan")}, {"temperature": "2"}]
)
def test_stored_calibration_out_of_range_is_refused(raw: object) -> None:
    with pytest.raises(CalibrationError):
        Calibration.from_dict(raw)
