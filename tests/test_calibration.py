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
    fit_margin,
    fit_temperature,
    log_margin,
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
    "raw",
    [
        None,
        {},
        {"temperature": 0.0},
        {"temperature": float("nan")},
        {"temperature": "2"},
        {"temperature": 1.0, "margin_power": 3.0},
        {"temperature": 1.0, "margin_power": float("nan")},
        {"temperature": 1.0, "margin_power": "0"},
    ],
)
def test_stored_calibration_out_of_range_is_refused(raw: object) -> None:
    with pytest.raises(CalibrationError):
        Calibration.from_dict(raw)


def _sampled_by_margin(t0: float, b: float, n: int = 40_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(logits / (t0 * margin ** b)): a model over-confident on close
    calls when b < 0, the Fashion-MNIST model's case."""
    g = torch.Generator().manual_seed(1)
    logits = 3.0 * torch.randn(n, 10, generator=g)
    probs = calibrated(logits, t0, b)
    return logits, torch.multinomial(probs, 1, generator=g).squeeze(1)


@pytest.fixture(scope="module")
def margin_case() -> tuple[torch.Tensor, torch.Tensor, Calibration]:
    logits, labels = _sampled_by_margin(0.7, -0.3)
    return logits, labels, fit(logits, labels, "synthetic")


def test_the_margin_power_and_temperature_the_labels_were_drawn_with_are_found(
    margin_case: tuple[torch.Tensor, torch.Tensor, Calibration],
) -> None:
    logits, labels, done = margin_case
    # 40,000 draws: both within a few standard errors, far from plain scaling's b = 0.
    assert done.margin_power == pytest.approx(-0.3, abs=0.06)
    assert done.temperature == pytest.approx(0.7, rel=0.08)
    assert fit_margin(logits[:2000], labels[:2000])[1] < 0


def test_the_margin_fit_beats_one_temperature_where_one_is_not_enough_and_keeps_the_ranking(
    margin_case: tuple[torch.Tensor, torch.Tensor, Calibration],
) -> None:
    logits, labels, done = margin_case
    plain = calibrated(logits, fit_temperature(logits, labels))
    assert done.nll_after is not None
    assert done.nll_after < negative_log_likelihood(plain, labels)
    assert torch.equal(done.apply(logits).argmax(1), logits.argmax(1))
    assert Calibration.from_dict(done.as_dict()) == done
    assert "margin" in done.describe()


def test_without_a_margin_power_it_is_plain_temperature_scaling() -> None:
    logits, _ = _sampled(1.0, n=100)
    old = Calibration.from_dict({"temperature": 0.5, "method": "temperature scaling"})
    assert old.margin_power == 0.0
    torch.testing.assert_close(old.apply(logits), (logits / 0.5).softmax(1))
    # A tie between the top two classes is a tiny margin, not log(0).
    assert torch.isfinite(log_margin(torch.zeros(2, 10))).all()
    assert torch.isfinite(calibrated(torch.zeros(2, 10), 1.0, -0.5)).all()
