"""Confidence intervals and paired tests: a vectorised patient bootstrap and DeLong's test.

The bootstrap resamples PATIENTS with replacement (images of one patient are correlated) and takes all images
of each drawn patient. A draw is stored as a multiplicity per patient, so every metric of a resample is a
weighted metric of the original table: AUROC from per-distinct-score weighted counts, F1/ACC from weighted
confusion counts. This scores all resamples of one class with a handful of array operations (no Python loop
over resamples), and equals recomputing the metric on the materialised resample (tested against that).

Metrics per resample follow :func:`medbridge.engine.metrics.evaluate_scores`: AUROC; F1/ACC at the given
(validation) thresholds; F1/ACC at the oracle threshold picked once on the full evaluated set and held fixed
(re-picking it on every resample would add the optimism of a maximum over thresholds to every resample and shift
the percentile interval above the point estimate); the resampled ECE, biased upward the same way, is recentred
on the full set's value (:func:`recentred`). A class with no positive or no negative in a resample is left
out of that resample's macro mean and counted in ``dropped``."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

METRICS = ("auroc", "f1", "acc", "f1_oracle", "acc_oracle", "brier", "ece")
LEVEL = 0.95
MIN_CASES = 5  # fewer positives or negatives than this in a test part: "n too small", no interval is shown


#: resamples per interval unless a run's ``eval.n_boot`` (``--n-boot``) says otherwise
DEFAULT_N_BOOT = 1000


def patient_inverse(patient_ids: Iterable) -> tuple[np.ndarray, int]:
    """Patient index of every image and the number of patients."""
    _, inverse = np.unique(np.asarray(list(patient_ids), dtype=str), return_inverse=True)
    return inverse.ravel(), int(inverse.max()) + 1 if len(inverse) else 0


def draw_patients(n_patients: int, n_boot: int, seed) -> np.ndarray:
    """(n_boot, n_patients) multiplicities: how often each patient is drawn in each resample (seeded)."""
    if n_patients == 0:
        raise ValueError("cannot bootstrap an empty set (no patients)")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_patients, size=(n_boot, n_patients))
    flat = draws + (np.arange(n_boot) * n_patients)[:, None]
    return np.bincount(flat.ravel(), minlength=n_boot * n_patients).reshape(n_boot, n_patients).astype(np.int32)


def _groups(sorted_scores: np.ndarray) -> np.ndarray:
    """Start index of each run of equal scores in a sorted array."""
    return np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]


def weighted_auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of every resample, ``weights`` (B, n) = multiplicity of each image (ties count one half)."""
    order = np.argsort(scores, kind="mergesort")
    s, y, w = scores[order], labels[order].astype(bool), weights[:, order]
    starts = _groups(s)
    neg = np.add.reduceat(w * ~y, starts, axis=1)
    pos = np.add.reduceat(w * y, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(1)
    den = pos.sum(1) * neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def weighted_f1_acc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray, threshold: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """F1 and ACC at a fixed threshold (predict positive if score >= threshold) for every resample."""
    pred, y = scores >= threshold, labels.astype(bool)
    tp, fp, fn = weights @ (pred & y), weights @ (pred & ~y), weights @ (~pred & y)
    total = weights.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1e-300), 0.0)
        acc = (weights @ (pred == y)) / total
    valid = (weights @ y > 0) & (weights @ ~y > 0)
    return np.where(valid, f1, np.nan), np.where(valid, acc, np.nan)


def resampled_metrics(scores: np.ndarray, targets: np.ndarray, labels, image_counts: np.ndarray,
                      thresholds: dict | None = None, chunk: int | None = None) -> dict[str, np.ndarray]:
    """Per-class metric of every resample: {metric: (B, C)} with NaN where the class is not evaluable in that
    resample (or not at all, as in ``evaluate_scores``). ``image_counts`` (B, n) = multiplicity per image."""
    from .calibration import ece, weighted_brier_ece
    from .metrics import best_f1_threshold

    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    n_boot, n = image_counts.shape
    chunk = chunk or max(1, int(4e6 // max(n, 1)))  # bounds the (chunk, n) float arrays to ~32 MB each
    keys = ["auroc", "f1_oracle", "acc_oracle", "brier", "ece"] + (["f1", "acc"] if thresholds is not None else [])
    out = {k: np.full((n_boot, len(labels)), np.nan) for k in keys}
    for j, lab in enumerate(labels):
        known = ~np.isnan(targets[:, j])
        s, y = scores[known, j], targets[known, j]
        if (y == 1).sum() == 0 or (y == 0).sum() == 0:
            continue  # skipped on the full set: left out everywhere
        t = thresholds.get(lab) if thresholds is not None else None
        t_oracle = best_f1_threshold(s, y)
        for b0 in range(0, n_boot, chunk):
            w = image_counts[b0:b0 + chunk][:, known].astype(np.float64)
            out["auroc"][b0:b0 + chunk, j] = weighted_auroc(s, y, w)
            f1o, acco = weighted_f1_acc(s, y, w, t_oracle)
            out["f1_oracle"][b0:b0 + chunk, j], out["acc_oracle"][b0:b0 + chunk, j] = f1o, acco
            valid = ((w @ (y == 1)) > 0) & ((w @ (y == 0)) > 0)  # as AUROC: only resamples with both classes
            br, ec = weighted_brier_ece(s, y, w)
            out["brier"][b0:b0 + chunk, j] = np.where(valid, br, np.nan)
            out["ece"][b0:b0 + chunk, j] = np.where(valid, ec, np.nan)
            if t is not None and np.isfinite(t):
                f1, acc = weighted_f1_acc(s, y, w, t)
                out["f1"][b0:b0 + chunk, j], out["acc"][b0:b0 + chunk, j] = f1, acc
        out["ece"][:, j] = recentred(out["ece"][:, j], ece(s, y))
    return out


def recentred(samples: np.ndarray, point: float) -> np.ndarray:
    """Bootstrap samples of the ECE shifted by their bias (mean minus the full set's value), floored at 0.

    The ECE of a resample is biased upward (a bin's |mean gap| grows with the noise that duplicated patients add),
    so the plain percentile interval can lie wholly above the point estimate; the shifted samples keep the spread
    and are centred on the point (Efron's bias correction, applied to every sample)."""
    if not np.isfinite(samples).any():
        return samples
    return np.maximum(samples - (np.nanmean(samples) - point), 0.0)


def macro_of(per_class: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Macro (mean over the classes evaluable in each resample) of :func:`resampled_metrics` output."""
    with np.errstate(invalid="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return {k: np.nanmean(v, axis=1) for k, v in per_class.items()}


def interval(samples: np.ndarray, level: float = LEVEL) -> list[float]:
    """Percentile interval of bootstrap samples (NaN resamples ignored); [nan, nan] if none."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if len(samples) == 0:
        return [float("nan"), float("nan")]
    a = (1 - level) / 2
    return [float(np.quantile(samples, a)), float(np.quantile(samples, 1 - a))]


def bootstrap_p(diffs: np.ndarray) -> float:
    """Two-sided bootstrap p-value of a difference being 0: twice the smaller tail share of the resampled
    differences at or beyond 0, with the (k + 1) / (B + 1) correction (never exactly 0)."""
    d = np.asarray(diffs, dtype=np.float64)
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return float("nan")
    tail = min((d <= 0).sum(), (d >= 0).sum())
    return float(min(1.0, 2 * (tail + 1) / (len(d) + 1)))


def image_counts_for(patient_ids, n_boot: int, seed) -> np.ndarray:
    """(n_boot, n_images) multiplicity of every image under a seeded patient bootstrap."""
    inverse, n_patients = patient_inverse(patient_ids)
    return draw_patients(n_patients, n_boot, seed)[:, inverse]


def _summarise(per_class: dict[str, np.ndarray], labels, n_boot: int, seed, n_patients: int) -> dict:
    macro = macro_of(per_class)
    auroc = per_class["auroc"]
    evaluable = ~np.all(np.isnan(auroc), axis=0)
    dropped = {lab: int(np.isnan(auroc[:, j]).sum()) for j, lab in enumerate(labels)
               if evaluable[j] and np.isnan(auroc[:, j]).any()}
    return {"n_boot": n_boot, "seed": seed, "level": LEVEL, "unit": "patient", "patients": n_patients,
            "macro": {k: interval(v) for k, v in macro.items()},
            "per_class": {lab: {k: interval(per_class[k][:, j]) for k in per_class}
                          for j, lab in enumerate(labels) if evaluable[j]},
            "dropped": dropped}


def bootstrap_metrics(scores, targets, labels, patient_ids, thresholds: dict | None = None,
                      n_boot: int = DEFAULT_N_BOOT, seed: int = 0) -> dict:
    """95% patient-bootstrap intervals of every macro and per-class metric of ``evaluate_scores``.
    ``dropped``: per class, the number of resamples without a positive or negative (left out of those
    resamples' macro mean)."""
    labels = list(labels)
    if n_boot == 0:
        return {"n_boot": 0}
    inverse, n_patients = patient_inverse(patient_ids)
    counts = draw_patients(n_patients, n_boot, seed)[:, inverse]
    per_class = resampled_metrics(scores, targets, labels, counts, thresholds)
    return _summarise(per_class, labels, n_boot, seed, n_patients)


def paired_bootstrap(scores_a, scores_b, targets, labels, patient_ids, n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
                     metric: str = "auroc") -> dict:
    """Difference a - b of the macro (and per-class) ``metric`` of two methods scored on the same images, with
    its patient-bootstrap interval and two-sided p-value (both methods scored on the same draw)."""
    from .metrics import evaluate_scores

    labels = list(labels)
    full_a, full_b = evaluate_scores(scores_a, targets, labels), evaluate_scores(scores_b, targets, labels)
    diff = full_a["macro"][metric] - full_b["macro"][metric]
    out = {"metric": metric, "a": full_a["macro"][metric], "b": full_b["macro"][metric], "diff": diff,
           "n": int(len(targets)), "classes": full_a["classes"], "n_boot": n_boot, "seed": seed}
    if n_boot == 0:
        return out
    inverse, n_patients = patient_inverse(patient_ids)
    counts = draw_patients(n_patients, n_boot, seed)[:, inverse]
    ra = resampled_metrics(scores_a, targets, labels, counts)[metric]
    rb = resampled_metrics(scores_b, targets, labels, counts)[metric]
    d = macro_of({metric: ra})[metric] - macro_of({metric: rb})[metric]
    out.update({"ci": interval(d), "p": bootstrap_p(d), "patients": n_patients,
                "per_class": {lab: {"diff": full_a["per_class"][lab][metric] - full_b["per_class"][lab][metric],
                                    "ci": interval(ra[:, j] - rb[:, j]), "p": bootstrap_p(ra[:, j] - rb[:, j])}
                              for j, lab in enumerate(labels) if lab in full_a["per_class"]}})
    return out


def delong_covariance(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """AUCs of k scorings of the same cases and their DeLong (1988) k x k covariance matrix (the midrank form
    of Sun & Xu 2014). ``scores``: k score vectors (or one); ``labels``: 1 = positive. The diagonal is each
    AUC's variance (its root: the DeLong standard error, as pROC's ``var``/``ci.auc`` report it)."""
    from scipy.stats import rankdata

    y = np.asarray(labels).astype(bool).ravel()
    rows = scores if isinstance(scores, (list, tuple)) else np.atleast_2d(scores)
    rows = [np.asarray(r, dtype=np.float64).ravel() for r in rows]
    if any(len(r) != len(y) for r in rows):
        raise ValueError(f"DeLong: every score vector needs one score per label ({len(y)} labels), got lengths "
                         f"{[len(r) for r in rows]}")
    s = np.vstack(rows)
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        raise ValueError(f"DeLong's test needs positives and negatives (got {m} positive, {n} negative)")
    tz, tx, ty = rankdata(s, axis=1), rankdata(s[:, y], axis=1), rankdata(s[:, ~y], axis=1)
    aucs = (tz[:, y].sum(1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, y] - tx) / n  # per positive: share of negatives scored below it (ties 1/2)
    v01 = 1 - (tz[:, ~y] - ty) / m  # per negative: share of positives scored above it
    k = len(s)
    s10 = np.cov(v10).reshape(k, k) if m > 1 else np.zeros((k, k))
    s01 = np.cov(v01).reshape(k, k) if n > 1 else np.zeros((k, k))
    return aucs, s10 / m + s01 / n


def delong_test(scores_a, scores_b, labels) -> dict:
    """DeLong, DeLong & Clarke-Pearson (1988) test of two correlated AUROCs on the same cases (the fast
    midrank form of Sun & Xu 2014): AUCs, difference, its standard error, z and the two-sided p-value."""
    from scipy.stats import norm

    y = np.asarray(labels).astype(bool)
    m, n = int(y.sum()), int((~y).sum())
    aucs, cov = delong_covariance([scores_a, scores_b], y)
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff = float(aucs[0] - aucs[1])
    if var <= 1e-300:
        z, p = (0.0, 1.0) if abs(diff) < 1e-15 else (float("inf"), 0.0)
    else:
        z = diff / np.sqrt(var)
        p = float(2 * norm.sf(abs(z)))
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "diff": diff, "se": float(np.sqrt(max(var, 0.0))),
            "z": float(z), "p": p, "positives": m, "negatives": n}


def delong_per_class(scores_a, scores_b, targets, labels) -> dict:
    """DeLong's test per class over the images whose label is known (classes without both classes skipped)."""
    out = {}
    targets = np.asarray(targets, dtype=np.float64)
    for j, lab in enumerate(labels):
        known = ~np.isnan(targets[:, j])
        y = targets[known, j]
        if (y == 1).any() and (y == 0).any():
            out[lab] = delong_test(np.asarray(scores_a)[known, j], np.asarray(scores_b)[known, j], y)
    return out


# ----- cross-validation: mean over folds with a bootstrap stratified by fold -----

def fold_seed(seed: int, fold: int) -> list[int]:
    return [int(seed), 104729, int(fold)]


def cv_bootstrap(folds: list[dict], labels, n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
                 methods: list[str] | None = None) -> dict:
    """Mean-over-folds metrics with a patient bootstrap stratified by fold (patients are redrawn within each
    fold; every method is scored on the same draws). ``folds[k] = {"targets": (n_k, C), "patients": (n_k,),
    "scores": {method: (n_k, C)}, "thresholds": {method: {label: t} | None}}``. Returns per method the point
    estimates (mean over folds of each fold's metric) with intervals, and the paired differences of every
    method to the first, with interval and p-value."""
    from .metrics import evaluate_scores

    labels = list(labels)
    methods = methods or list(folds[0]["scores"])
    per_fold = {m: [] for m in methods}
    samples = {m: [] for m in methods}  # per fold: {metric: (B, C)}
    for k, f in enumerate(folds):
        counts = (image_counts_for(f["patients"], n_boot, fold_seed(seed, k)) if n_boot else None)
        for m in methods:
            thr = f["thresholds"].get(m)
            per_fold[m].append(evaluate_scores(f["scores"][m], f["targets"], labels, thr))
            if n_boot:
                samples[m].append(resampled_metrics(f["scores"][m], f["targets"], labels, counts, thr))
    result = {"n_boot": n_boot, "seed": seed, "level": LEVEL, "folds": len(folds), "unit": "patient, within fold",
              "methods": {}, "paired": {}}

    def fold_mean(values: list[float]) -> float:
        v = np.asarray(values, dtype=np.float64)
        return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")

    for m in methods:
        keys = list(per_fold[m][0]["macro"])
        point = {k: fold_mean([r["macro"].get(k, np.nan) for r in per_fold[m]]) for k in keys}
        cls = {lab: {k: fold_mean([r["per_class"][lab].get(k, np.nan) for r in per_fold[m]
                                   if lab in r["per_class"]]) for k in keys}
               for lab in labels if any(lab in r["per_class"] for r in per_fold[m])}
        res = {"macro": point, "per_class": cls,
               "fold_macro": [r["macro"] for r in per_fold[m]],
               "skipped": {f"fold {k}": r["skipped"] for k, r in enumerate(per_fold[m]) if r["skipped"]}}
        if n_boot:
            macro_b = {k: _mean_over_folds([macro_of(s)[k] for s in samples[m]]) for k in keys}
            res["ci"] = {"macro": {k: interval(v) for k, v in macro_b.items()},
                         "per_class": {lab: {k: interval(_mean_over_folds([s[k][:, labels.index(lab)]
                                                                             for s in samples[m]]))
                                             for k in keys} for lab in cls},
                         "n_boot": n_boot, "seed": seed, "level": LEVEL, "unit": "patient, within fold"}
            res["_macro_samples"] = macro_b
        result["methods"][m] = res
    base = methods[0]
    for m in methods[1:]:
        diffs = [r_a["macro"]["auroc"] - r_b["macro"]["auroc"] for r_a, r_b in zip(per_fold[base], per_fold[m])]
        pair = {"metric": "auroc", "a": base, "b": m, "diff": fold_mean(diffs), "fold_diffs": diffs}
        if n_boot:
            d = result["methods"][base]["_macro_samples"]["auroc"] - result["methods"][m]["_macro_samples"]["auroc"]
            pair.update({"ci": interval(d), "p": bootstrap_p(d)})
            pc = {}
            for lab in result["methods"][base]["per_class"]:
                j = labels.index(lab)
                dj = _mean_over_folds([sa["auroc"][:, j] - sb["auroc"][:, j]
                                       for sa, sb in zip(samples[base], samples[m])])
                point_j = fold_mean([ra["per_class"][lab]["auroc"] - rb["per_class"][lab]["auroc"]
                                     for ra, rb in zip(per_fold[base], per_fold[m])
                                     if lab in ra["per_class"] and lab in rb["per_class"]])
                pc[lab] = {"diff": point_j, "ci": interval(dj), "p": bootstrap_p(dj)}
            pair["per_class"] = pc
        result["paired"][f"{base} - {m}"] = pair
    for m in methods:
        result["methods"][m].pop("_macro_samples", None)
    return result


def _mean_over_folds(arrays: list[np.ndarray]) -> np.ndarray:
    """Per resample, the mean over folds (folds where the value is NaN in that resample are left out)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.vstack(arrays), axis=0)


# ----- formatting -----

def fmt_ci(value: float, ci: list[float] | None, digits: int = 1, scale: float = 100.0) -> str:
    """``78.4 [72.1, 84.0]`` (``78.4`` without an interval, ``-`` for NaN)."""
    if value is None or not np.isfinite(value):
        return "-"
    text = f"{scale * value:.{digits}f}"
    if ci and all(c is not None and np.isfinite(c) for c in ci):
        text += f" [{scale * ci[0]:.{digits}f}, {scale * ci[1]:.{digits}f}]"
    return text


def too_small(positives: int, negatives: int, min_cases: int = MIN_CASES) -> bool:
    """Whether a class (or group) has too few positives or negatives for an interval to mean anything."""
    return int(positives) < min_cases or int(negatives) < min_cases


def fmt_class(value: float, ci: list[float] | None, positives: int | None, negatives: int | None) -> str:
    """``fmt_ci``, but ``62.0 (n too small: 3 positives)`` without an interval below ``MIN_CASES``."""
    if positives is not None and negatives is not None and too_small(positives, negatives):
        if value is None or not np.isfinite(value):
            return "n too small"
        n, what = (int(positives), "positive") if positives < MIN_CASES else (int(negatives), "negative")
        few = f"{n} {what}{'' if n == 1 else 's'}"
        return f"{fmt_ci(value, None)} (n too small: {few})"
    return fmt_ci(value, ci)


def fmt_diff(pair: dict, digits: int = 1, scale: float = 100.0) -> str:
    """``+5.5 [+1.9, +7.9], p = 0.004`` (a difference with its interval and p-value)."""
    d = pair.get("diff", float("nan"))
    if d is None or not np.isfinite(d):
        return "-"
    text = signed(scale * d, digits)
    ci = pair.get("ci")
    if ci and all(np.isfinite(ci)):
        text += f" [{signed(scale * ci[0], digits)}, {signed(scale * ci[1], digits)}]"
    if pair.get("p") is not None and np.isfinite(pair["p"]):
        text += f", p = {fmt_p(pair['p'])}"
    return text


def signed(x: float, digits: int = 1) -> str:
    """``+1.2`` / ``-1.2``; a value that rounds to zero is ``+0.0`` whatever its sign (no ``-0.0``)."""
    text = f"{x:+.{digits}f}"
    return "+" + text[1:] if float(text) == 0 else text


def fmt_p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else "< 0.001"


def verdict(pair: dict, a: str, b: str) -> str:
    """Plain words: a real difference when the interval excludes 0, else a tie."""
    ci = pair.get("ci")
    if not ci or not all(np.isfinite(ci)):
        return "no interval"
    if ci[0] > 0:
        return f"{a} better (interval excludes 0)"
    if ci[1] < 0:
        return f"{b} better (interval excludes 0)"
    return "tie (interval contains 0)"


__all__ = ["METRICS", "bootstrap_metrics", "paired_bootstrap", "delong_test", "delong_per_class", "delong_covariance",
           "cv_bootstrap", "resampled_metrics", "image_counts_for", "draw_patients", "weighted_auroc", "interval",
           "bootstrap_p", "fmt_ci", "fmt_class", "fmt_diff", "too_small", "MIN_CASES", "fmt_p", "verdict",
           "DEFAULT_N_BOOT"]
