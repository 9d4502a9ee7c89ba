"""Calibration: Brier score, expected calibration error (ECE), reliability curves, and post-hoc calibrators.

A calibrator maps each class's probability ``p`` to ``sigmoid(a * logit(p) + b)`` with ``a > 0`` (strictly
increasing, so the ranking and hence every AUROC is unchanged): ``temperature`` fits ``a = 1/T`` with ``b = 0``,
``platt`` fits both. It is fitted per class on the VALIDATION part only (a class without a positive or a negative
there keeps the identity), saved in the method's ``adapter.json`` with a digest (a hand-edited or damaged
calibrator is refused on load, like the weights), and applied by eval, predict and serve."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..io import CorruptFileError, atomic_write_bytes, read_json

KINDS = ("none", "temperature", "platt")
ECE_BINS = 10  # equal-width probability bins of the ECE and the reliability diagram
EPS = 1e-7  # probabilities are clipped to [EPS, 1 - EPS] before the logit
A_RANGE = (0.05, 20.0)  # bounds of the slope a (a > 0 keeps the order; bounded so scores never saturate early)


def brier(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean squared difference of probability and outcome (0 = perfect; 0.25 = always saying 50 %)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    return float(np.mean((s - y) ** 2)) if len(s) else float("nan")


def bin_index(scores: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """Equal-width bin of each probability (1.0 falls in the last bin)."""
    return np.clip((np.asarray(scores, dtype=np.float64) * bins).astype(int), 0, bins - 1)


def ece(scores: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: over equal-width bins, the share of images in the bin times the gap between
    the bin's mean probability and its observed positive rate."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if not len(s):
        return float("nan")
    gaps = np.bincount(bin_index(s, bins), weights=s - y, minlength=bins)
    return float(np.abs(gaps).sum() / len(s))


def weighted_brier_ece(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray, bins: int = ECE_BINS
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Brier score and ECE of every resample; ``weights`` (B, n) = multiplicity of each image."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    total = weights.sum(1)
    onehot = np.zeros((len(s), bins))
    onehot[np.arange(len(s)), bin_index(s, bins)] = s - y
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ (s - y) ** 2) / total, np.abs(weights @ onehot).sum(1) / total


def reliability_curve(scores: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Per non-empty bin: mean probability, observed positive rate and count (the reliability diagram)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    idx = bin_index(s, bins)
    count = np.bincount(idx, minlength=bins)
    keep = count > 0
    mean_p = np.bincount(idx, weights=s, minlength=bins)[keep] / count[keep]
    rate = np.bincount(idx, weights=y, minlength=bins)[keep] / count[keep]
    return {"mean_probability": mean_p.tolist(), "positive_rate": rate.tolist(), "count": count[keep].tolist()}


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def _fit_one(scores: np.ndarray, labels: np.ndarray, kind: str) -> tuple[float, float]:
    """(a, b) minimising the log loss of sigmoid(a * logit(p) + b) on these (validation) scores."""
    from scipy.optimize import minimize

    z, y = _logit(scores), np.asarray(labels, dtype=np.float64)

    def loss(theta):
        a = np.exp(theta[0])
        b = theta[1] if kind == "platt" else 0.0
        t = a * z + b
        nll = np.logaddexp(0, t) - y * t  # -log-likelihood of a Bernoulli with logit t
        sig = 0.5 * (1 + np.tanh(t / 2))
        grad_t = sig - y
        g = np.array([np.sum(grad_t * z) * a, np.sum(grad_t) if kind == "platt" else 0.0])
        return nll.sum(), g

    lo, hi = np.log(A_RANGE[0]), np.log(A_RANGE[1])
    res = minimize(loss, np.zeros(2), jac=True, method="L-BFGS-B", bounds=[(lo, hi), (-20.0, 20.0)])
    return float(np.exp(res.x[0])), float(res.x[1]) if kind == "platt" else 0.0


def fit_calibrator(kind: str, scores: np.ndarray, targets: np.ndarray, labels) -> dict | None:
    """Per-class calibrator fitted on validation scores/targets (``none``: None). Unknown (NaN) targets are
    skipped; a class without a positive or a negative keeps the identity (a = 1, b = 0) and is listed."""
    if kind not in KINDS:
        raise ValueError(f"eval.calibrate: {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "none":
        return None
    params, identity = {}, []
    for j, lab in enumerate(labels):
        known = ~np.isnan(targets[:, j])
        s, y = scores[known, j], targets[known, j]
        if (y == 1).sum() == 0 or (y == 0).sum() == 0:
            params[lab] = [1.0, 0.0]
            identity.append(lab)
            continue
        params[lab] = list(_fit_one(s, y, kind))
    return {"kind": kind, "fitted_on": "validation", "params": params, "identity": identity}


def apply_calibration(calibrator: dict | None, scores: np.ndarray, labels) -> np.ndarray:
    """Calibrated probabilities (the scores unchanged without a calibrator)."""
    if not calibrator:
        return scores
    out = np.array(scores, dtype=np.float64, copy=True)
    for j, lab in enumerate(labels):
        a, b = calibrator["params"].get(lab, (1.0, 0.0))
        if a == 1.0 and b == 0.0:
            continue
        t = a * _logit(out[:, j]) + b
        out[:, j] = 0.5 * (1 + np.tanh(t / 2))
    return out


def _digest(calibrator: dict) -> str:
    return hashlib.sha256(json.dumps(calibrator, sort_keys=True).encode()).hexdigest()


def save_calibrator(method_folder: Path, calibrator: dict | None) -> None:
    """Store the calibrator (and its digest) in the method's ``adapter.json``, atomically."""
    if not calibrator:
        return
    path = Path(method_folder) / "adapter.json"
    meta = read_json(path, "method config")
    meta["calibration"], meta["calibration_sha256"] = calibrator, _digest(calibrator)
    atomic_write_bytes(path, json.dumps(meta, indent=1, default=float).encode())


def load_calibrator(method_folder: Path, labels) -> dict | None:
    """The calibrator saved with a method (None if it has none), checked: digest, kind, one (a > 0, b) per label."""
    path = Path(method_folder) / "adapter.json"
    if not path.is_file():
        return None
    meta = read_json(path, "method config")
    cal = meta.get("calibration")
    if cal is None:
        return None
    if meta.get("calibration_sha256") != _digest(cal):
        raise CorruptFileError(f"{path}: field 'calibration' does not match its digest calibration_sha256 "
                               "(edited or damaged); refit with --set eval.calibrate=...")
    if cal.get("kind") not in KINDS[1:] or not isinstance(cal.get("params"), dict):
        raise CorruptFileError(f"{path}: field 'calibration': expected kind temperature/platt and params")
    for lab in labels:
        ab = cal["params"].get(lab)
        if not (isinstance(ab, list) and len(ab) == 2 and all(isinstance(v, (int, float)) for v in ab)
                and np.isfinite(ab).all() and ab[0] > 0):
            raise CorruptFileError(f"{path}: field 'calibration.params.{lab}': expected [a > 0, b] finite, got {ab!r}")
    return cal


__all__ = ["KINDS", "ECE_BINS", "brier", "ece", "weighted_brier_ece", "reliability_curve", "fit_calibrator",
           "apply_calibration", "save_calibrator", "load_calibrator"]


def calibrate_fitted(kind: str, folder: Path, scores_val, targets_val, scores_test, labels):
    """After training: fit ``kind`` on the validation scores only, save it with the method in ``folder`` and
    return the calibrated validation and test scores and the raw test scores (None without calibration)."""
    if kind == "none" or scores_val is None:
        return scores_val, scores_test, None
    cal = fit_calibrator(kind, scores_val, targets_val, labels)
    save_calibrator(folder, cal)
    return apply_calibration(cal, scores_val, labels), apply_calibration(cal, scores_test, labels), scores_test
