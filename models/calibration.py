"""A reranker's match logit as a probability of match, calibrated on held-out data (Platt or temperature scaling).

    p = sigmoid(a * logit + b)         Platt: a and b fitted; temperature: b = 0, a = 1 / T

The fit lives in a small JSON sidecar beside the reranker checkpoint, `<name>.calibration.json`
(data/demo/reranker.calibration.json for the demo bundle), holding the sha256 of the checkpoint it
was fitted for: a calibration whose hash is not the reranker's is ignored, so retraining a
reranker never leaves a stale one in use. Without a calibration, the probability is the plain
sigmoid of the logit (`calibrated` False), which is what the fusion model's matching loss
trains it towards, but nothing has checked it. Imports numpy only.

    >>> cal = fit(logits, labels, reranker_sha256=sha)
    >>> cal.probability(np.array([0.0, 3.0]))
    array([0.31, 0.93])
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from itm.common.durable import write_durably
from itm.common.errors import CheckpointError

METHODS = ("platt", "temperature")
BINS = 10  # equal-width probability bins of the reliability diagram and the ECE
FORMAT = 1


@dataclass(frozen=True)
class Calibration:
    a: float  # slope on the logit (1 / temperature)
    b: float  # offset (0 for temperature scaling)
    method: str  # one of METHODS, or "sigmoid" for the uncalibrated fallback
    reranker_sha256: str | None  # the checkpoint it was fitted for
    calibrated: bool = True
    fitted_on: dict[str, Any] = field(default_factory=dict)  # what data, how many pairs, ECE before and after

    def probability(self, logits: np.ndarray) -> np.ndarray:
        return _sigmoid(self.a * np.asarray(logits, np.float64) + self.b)


UNCALIBRATED = Calibration(1.0, 0.0, "sigmoid", None, calibrated=False)


def fit(logits: np.ndarray, labels: np.ndarray, reranker_sha256: str | None, method: str = "platt",
        fitted_on: dict[str, Any] | None = None) -> Calibration:
    """Fit p = sigmoid(a * logit + b) to (logit, label) pairs by maximum likelihood (Newton's method)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    x, y = np.asarray(logits, np.float64).ravel(), np.asarray(labels, np.float64).ravel()
    if len(x) != len(y) or not len(x) or y.min() == y.max():
        raise ValueError("calibration needs pairs of both labels (some matches and some non-matches)")
    a, b = _newton(x, y, fit_offset=method == "platt")
    before, after = ece(_sigmoid(x), y), ece(_sigmoid(a * x + b), y)
    info = {**(fitted_on or {}), "pairs": int(len(x)), "positives": int(y.sum()), "ece_sigmoid": before,
            "ece_calibrated": after}
    return Calibration(float(a), float(b), method, reranker_sha256, True, info)


def _newton(x: np.ndarray, y: np.ndarray, fit_offset: bool, steps: int = 100) -> tuple[float, float]:
    """Logistic regression of y on x (and an offset) by damped Newton steps, with a tiny ridge so that separable
    data stays finite."""
    X = np.stack([x, np.ones_like(x)], 1)  # (N, 2)
    ridge = 1e-6 * len(x)
    free = np.array([1.0, 1.0 if fit_offset else 0.0])  # temperature scaling keeps the offset at 0

    def loss(w: np.ndarray) -> float:
        z = X @ w
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * ridge * w @ w)

    w = np.array([1.0, 0.0])
    for _ in range(steps):
        p = _sigmoid(X @ w)
        grad = (X.T @ (p - y) + ridge * w) * free
        hess = (X * (p * (1 - p))[:, None]).T @ X + ridge * np.eye(2)
        hess = hess * np.outer(free, free) + np.diag(1 - free)
        step, t, before = np.linalg.solve(hess, grad), 1.0, loss(w)
        while loss(w - t * step) > before and t > 1e-6:
            t /= 2
        w = w - t * step
        if np.abs(t * step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> list[dict[str, float]]:
    """Per equal-width probability bin: pairs, mean predicted probability, observed share of matches."""
    p, y = np.asarray(probs, np.float64).ravel(), np.asarray(labels, np.float64).ravel()
    which = np.minimum((p * bins).astype(int), bins - 1)
    out = []
    for i in range(bins):
        sel = which == i
        out.append({"lo": i / bins, "hi": (i + 1) / bins, "n": int(sel.sum()),
                    "predicted": float(p[sel].mean()) if sel.any() else float("nan"),
                    "observed": float(y[sel].mean()) if sel.any() else float("nan")})
    return out


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: the pair-weighted mean gap between predicted and observed, over the bins."""
    rows = reliability(probs, labels, bins)
    n = sum(r["n"] for r in rows)
    return float(sum(r["n"] * abs(r["predicted"] - r["observed"]) for r in rows if r["n"]) / max(n, 1))


def sidecar(reranker: Path | str) -> Path:
    """Where the calibration of the reranker checkpoint at `reranker` lives."""
    return Path(reranker).with_suffix(".calibration.json")


def save(cal: Calibration, reranker: Path | str) -> Path:
    path = sidecar(reranker)
    data = json.dumps({"format": FORMAT, **asdict(cal)}, indent=1, sort_keys=True).encode()
    write_durably(path, lambda f: f.write(data))
    return path


def load(rerankers: list[Path | str | None], sha256: str | None) -> Calibration:
    """The calibration beside the first of `rerankers` that has one fitted for the checkpoint `sha256`;
    UNCALIBRATED when none has."""
    for reranker in rerankers:
        if reranker is None:
            continue
        path = sidecar(reranker)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            raise CheckpointError(f"calibration {path} cannot be read ({e}); fit it again or delete it") from None
        if raw.get("reranker_sha256") != sha256:
            continue  # fitted for another version of the reranker
        try:
            return Calibration(float(raw["a"]), float(raw["b"]), str(raw["method"]), raw["reranker_sha256"],
                               True, dict(raw.get("fitted_on", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"calibration {path} is malformed ({e}); fit it again or delete it") from None
    return UNCALIBRATED


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, np.float64)))
