"""The paper's metrics (macro over classes present): AUROC, F1 at the F1-maximising threshold, ACC at it.

Thresholds are picked either on the evaluated set itself (the paper's protocol: optimistic, reported as
"oracle threshold") or on a validation set (honest). NaN targets are unknown and skipped per class; classes
without both positives and negatives are skipped and listed."""

from __future__ import annotations

import numpy as np


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie-averaged ranks); labels in {0, 1}."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(scores)  # ties get their average rank
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) over all thresholds, from (0, 0) to (1, 1)."""
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    s, y = np.asarray(scores)[order], np.asarray(labels)[order].astype(bool)
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp, fp = np.cumsum(y)[distinct], np.cumsum(~y)[distinct]
    return np.r_[0, fp / max(fp[-1], 1)], np.r_[0, tp / max(tp[-1], 1)]


def best_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The score threshold (predict positive if score >= t) that maximises F1 on these scores."""
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    s, y = np.asarray(scores)[order], np.asarray(labels)[order].astype(bool)
    if y.sum() == 0:
        return float("inf")
    tp = np.cumsum(y)
    k = np.arange(1, len(s) + 1)
    f1 = 2 * tp / (k + y.sum())
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # thresholds only between distinct scores
    best = last[np.argmax(f1[last])]
    return float(s[best])


def f1_acc(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float]:
    pred, y = np.asarray(scores) >= threshold, np.asarray(labels).astype(bool)
    tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return float(f1), float((pred == y).mean())


def evaluate_scores(scores: np.ndarray, targets: np.ndarray, labels: list[str] | tuple[str, ...],
                    thresholds: dict[str, float] | None = None) -> dict:
    """Per-class and macro AUROC / F1 / ACC / Brier / ECE. ``thresholds`` (e.g. from :func:`pick_thresholds` on
    validation) gives honest F1/ACC; F1/ACC at the oracle threshold (picked on these scores) are always reported
    too."""
    from .calibration import brier, ece

    per_class, skipped = {}, []
    for j, lab in enumerate(labels):
        known = ~np.isnan(targets[:, j])
        s, y = scores[known, j], targets[known, j]
        pos, neg = int((y == 1).sum()), int((y == 0).sum())
        if pos == 0 or neg == 0:
            skipped.append(lab)
            continue
        t_oracle = best_f1_threshold(s, y)
        f1_o, acc_o = f1_acc(s, y, t_oracle)
        row = {"auroc": auroc(s, y), "f1_oracle": f1_o, "acc_oracle": acc_o, "threshold_oracle": t_oracle,
               "brier": brier(s, y), "ece": ece(s, y), "n": int(known.sum()), "positives": pos, "negatives": neg}
        if thresholds is not None and lab in thresholds and np.isfinite(thresholds[lab]):
            row["f1"], row["acc"] = f1_acc(s, y, thresholds[lab])
            row["threshold"] = thresholds[lab]
        per_class[lab] = row
    keys = ["auroc", "f1_oracle", "acc_oracle", "brier", "ece"] + (["f1", "acc"] if thresholds is not None else [])
    macro = {k: float(np.mean([r[k] for r in per_class.values() if k in r])) if per_class else float("nan")
             for k in keys}
    return {"n": int(len(scores)), "classes": len(per_class), "macro": macro, "per_class": per_class,
            "skipped": skipped}


def pick_thresholds(scores: np.ndarray, targets: np.ndarray, labels) -> dict[str, float]:
    """Per-class F1-maximising thresholds on a (validation) set; classes without positives get +inf."""
    out = {}
    for j, lab in enumerate(labels):
        known = ~np.isnan(targets[:, j])
        y = targets[known, j]
        out[lab] = best_f1_threshold(scores[known, j], y) if (y == 1).any() else float("inf")
    return out
