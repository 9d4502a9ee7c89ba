"""Model selection on a validation split inside methods (the probe's C, LP++'s best epoch)."""

from __future__ import annotations

import numpy as np


def macro_auroc(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean AUROC over the classes with positives and negatives among the known (non-NaN) targets; NaN if none.
    Equals ``medbridge.engine.metrics.evaluate_scores(...)["macro"]["auroc"]`` (scikit-learn's AUROC)."""
    from sklearn.metrics import roc_auc_score

    values = []
    for j in range(targets.shape[1]):
        known = ~np.isnan(targets[:, j])
        y = targets[known, j]
        if (y == 1).any() and (y == 0).any():
            values.append(roc_auc_score(y, scores[known, j]))
    return float(np.mean(values)) if values else float("nan")
