"""Scores of public challenges, computed beside the paper's metrics when a dataset names its challenge
(``ImageTable.notes["challenge"]``).

ODIR-2019 (Ocular Disease Intelligent Recognition, https://odir2019.grand-challenge.org): the organisers'
evaluation script flattens the patients x 8 labels matrix and computes, at the fixed threshold 0.5, Cohen's kappa
and the (micro) F1 of the binary decisions and the AUROC of the probabilities over all label cells together; the
final score is their mean. Intervals: the same patient bootstrap as every other metric (weights per cell)."""

from __future__ import annotations

import numpy as np

from .stats import image_counts_for, interval

THRESHOLD = 0.5


def _odir(targets: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> dict[str, float]:
    from sklearn.metrics import cohen_kappa_score, f1_score, roc_auc_score

    known = ~np.isnan(targets)
    y = targets[known].astype(int)
    s = scores[known]
    w = None if weights is None else np.broadcast_to(weights[:, None], targets.shape)[known]
    if (w is not None and w.sum() == 0) or len(np.unique(y if w is None else y[w > 0])) < 2:
        return {"kappa": float("nan"), "f1": float("nan"), "auroc": float("nan"), "final": float("nan")}
    decided = (s > THRESHOLD).astype(int)
    kappa = float(cohen_kappa_score(y, decided, sample_weight=w))
    f1 = float(f1_score(y, decided, average="micro", sample_weight=w))
    auc = float(roc_auc_score(y, s, sample_weight=w))
    return {"kappa": kappa, "f1": f1, "auroc": auc, "final": (kappa + f1 + auc) / 3.0}


def odir_score(targets: np.ndarray, scores: np.ndarray, patient_ids=None, n_boot: int = 0,
               seed: int = 0) -> dict:
    """The ODIR-2019 score (kappa, F1, AUROC at threshold 0.5 and their mean) of [n, 8] probabilities, with 95%
    patient-bootstrap intervals when ``n_boot`` > 0."""
    out = _odir(np.asarray(targets, dtype=np.float64), np.asarray(scores, dtype=np.float64))
    result = {k: {"value": v} for k, v in out.items()}
    if n_boot and patient_ids is not None and len(targets):
        counts = image_counts_for(patient_ids, n_boot, seed)
        samples = [_odir(np.asarray(targets, dtype=np.float64), np.asarray(scores, dtype=np.float64),
                         c.astype(np.float64)) for c in counts]
        for k in out:
            result[k]["ci"] = interval(np.array([s[k] for s in samples]))
    result["threshold"] = THRESHOLD
    return result


CHALLENGES = {"odir": odir_score}


def challenge_scores(name: str | None, scores: dict[str, np.ndarray], targets: np.ndarray, patient_ids,
                     n_boot: int, seed: int = 0) -> dict:
    """{method: challenge score} for a dataset that names a challenge, else {}."""
    if not name or name not in CHALLENGES:
        return {}
    return {m: {"challenge": name, **CHALLENGES[name](targets, s, patient_ids, n_boot, seed)}
            for m, s in scores.items()}


def challenge_lines(scored: dict) -> list[str]:
    """Markdown table of challenge scores (empty when none)."""
    if not scored:
        return []
    from .stats import fmt_ci

    name = next(iter(scored.values()))["challenge"]
    lines = [f"{name.upper()} challenge score (its evaluation script: threshold 0.5 on all label cells):", "",
             "| method | kappa | F1 | AUROC | final (mean) |", "|---|---|---|---|---|"]
    for m, r in scored.items():
        cells = [fmt_ci(r[k]["value"], r[k].get("ci")) for k in ("kappa", "f1", "auroc", "final")]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines + [""]
