"""Platt and temperature scaling recover known probabilities; the sidecar is used only for the reranker it was fit for."""
import numpy as np
import pytest

from itm.models import calibration


def known(a, b, n=40_000, seed=0):
    """Logits and labels drawn so that P(match | logit) = sigmoid(a * logit + b) exactly."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 3.0, n)
    return x, rng.random(n) < 1 / (1 + np.exp(-(a * x + b)))


def test_platt_scaling_recovers_known_probabilities():
    x, y = known(0.5, -1.0)
    cal = calibration.fit(x, y, "sha")
    assert cal.a == pytest.approx(0.5, abs=0.03) and cal.b == pytest.approx(-1.0, abs=0.05)
    grid = np.linspace(-6, 6, 25)
    np.testing.assert_allclose(cal.probability(grid), 1 / (1 + np.exp(-(0.5 * grid - 1.0))), atol=0.02)
    assert cal.fitted_on["ece_calibrated"] < 0.02 < cal.fitted_on["ece_sigmoid"]  # the raw sigmoid is off
    assert cal.fitted_on["pairs"] == len(x) and cal.fitted_on["positives"] == int(y.sum())


def test_temperature_scaling_fits_the_slope_alone():
    x, y = known(0.25, 0.0, seed=1)
    cal = calibration.fit(x, y, "sha", method="temperature")
    assert cal.b == 0.0 and cal.a == pytest.approx(0.25, abs=0.02)


def test_reliability_bins_and_ece():
    probs = np.array([0.05, 0.05, 0.95, 0.95, 0.55])
    labels = np.array([0, 0, 1, 0, 1])
    rows = calibration.reliability(probs, labels)
    assert [r["n"] for r in rows] == [2, 0, 0, 0, 0, 1, 0, 0, 0, 2]
    assert rows[9]["observed"] == 0.5 and rows[0]["predicted"] == pytest.approx(0.05)
    assert calibration.ece(probs, labels) == pytest.approx((2 * 0.05 + 1 * 0.45 + 2 * 0.45) / 5)
    with pytest.raises(ValueError, match="both labels"):
        calibration.fit(np.zeros(3), np.ones(3), "sha")


def test_the_sidecar_applies_only_to_the_reranker_it_was_fit_for(tmp_path):
    reranker = tmp_path / "reranker.safetensors"
    x, y = known(0.5, -1.0, n=2000)
    saved = calibration.save(calibration.fit(x, y, "abc"), reranker)
    assert saved == tmp_path / "reranker.calibration.json"
    assert calibration.load([None, reranker], "abc").a == pytest.approx(calibration.fit(x, y, "abc").a)
    stale = calibration.load([reranker], "retrained")
    assert stale is calibration.UNCALIBRATED and not stale.calibrated
    assert stale.probability(np.array([0.0]))[0] == 0.5  # the plain sigmoid of the logit
