"""Patient bootstrap, paired comparison and DeLong's test (engine/stats.py)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from medbridge.engine.metrics import evaluate_scores, pick_thresholds
from medbridge.engine.stats import (
    bootstrap_metrics,
    bootstrap_p,
    cv_bootstrap,
    delong_test,
    draw_patients,
    fmt_ci,
    fmt_diff,
    interval,
    macro_of,
    paired_bootstrap,
    patient_inverse,
    resampled_metrics,
)


def _table(n=150, classes=4, patients=50, seed=0, unknown=0.1):
    rng = np.random.default_rng(seed)
    pid = rng.integers(0, patients, n).astype(str)
    t = (rng.random((n, classes)) < 0.3).astype(float)
    t[rng.random((n, classes)) < unknown] = np.nan
    s = np.round(rng.random((n, classes)) + 0.6 * np.nan_to_num(t), 2)  # rounded: many ties
    return s, t, pid, [f"c{j}" for j in range(classes)]


def test_vectorised_bootstrap_equals_recomputing_each_materialised_resample():
    s, t, pid, labels = _table()
    thr = pick_thresholds(s[:50], t[:50], labels)
    inverse, n_patients = patient_inverse(pid)
    counts = draw_patients(n_patients, 25, seed=3)[:, inverse]
    fast = resampled_metrics(s, t, labels, counts, thr)
    macro = macro_of(fast)
    oracle = {lab: r["threshold_oracle"] for lab, r in evaluate_scores(s, t, labels)["per_class"].items()}
    for b in range(25):
        idx = np.repeat(np.arange(len(s)), counts[b])  # the resample, written out image by image
        ref = evaluate_scores(s[idx], t[idx], labels, thr)
        at_oracle = evaluate_scores(s[idx], t[idx], labels, oracle)  # the full set's oracle thresholds, held fixed
        for key in ("auroc", "f1", "acc"):
            assert macro[key][b] == pytest.approx(ref["macro"][key], abs=1e-12), (b, key)
        for key in ("f1", "acc"):
            assert macro[f"{key}_oracle"][b] == pytest.approx(at_oracle["macro"][key], abs=1e-12), (b, key)
        for j, lab in enumerate(labels):
            for key in ("auroc", "f1", "acc"):
                want = ref["per_class"].get(lab, {}).get(key, np.nan)
                assert fast[key][b, j] == pytest.approx(want, abs=1e-12, nan_ok=True), (b, lab, key)
                if key != "auroc":
                    want = at_oracle["per_class"].get(lab, {}).get(key, np.nan)
                    assert fast[f"{key}_oracle"][b, j] == pytest.approx(want, abs=1e-12, nan_ok=True), (b, lab)


def test_bootstrap_is_seeded_and_brackets_the_point_estimate():
    s, t, pid, labels = _table(n=300, patients=120)
    thr = pick_thresholds(s, t, labels)
    a = bootstrap_metrics(s, t, labels, pid, thr, n_boot=300, seed=1)
    b = bootstrap_metrics(s, t, labels, pid, thr, n_boot=300, seed=1)
    c = bootstrap_metrics(s, t, labels, pid, thr, n_boot=300, seed=2)
    assert a["macro"] == b["macro"] and a["macro"] != c["macro"]
    point = evaluate_scores(s, t, labels, thr)["macro"]
    for key in ("auroc", "f1", "acc", "f1_oracle", "acc_oracle"):
        lo, hi = a["macro"][key]
        assert lo < point[key] < hi, key
    assert set(a["per_class"]) == set(labels) and a["unit"] == "patient" and a["patients"] == len(set(pid))


def test_resampling_by_patient_widens_the_interval_when_images_of_a_patient_are_alike():
    rng = np.random.default_rng(0)
    patients, per_patient = 40, 10
    y = np.repeat((rng.random(patients) < 0.5).astype(float), per_patient)[:, None]
    s = np.repeat(rng.random(patients) + 0.4 * y[::per_patient, 0], per_patient)[:, None]  # identical images
    pid = np.repeat(np.arange(patients), per_patient)
    by_patient = bootstrap_metrics(s, y, ["x"], pid, n_boot=400, seed=0)["macro"]["auroc"]
    by_image = bootstrap_metrics(s, y, ["x"], np.arange(len(s)), n_boot=400, seed=0)["macro"]["auroc"]
    assert (by_patient[1] - by_patient[0]) > 2 * (by_image[1] - by_image[0])


def test_classes_missing_in_a_resample_are_counted_not_nan():
    s, t, pid, labels = _table(n=60, patients=30)
    t[:, 0] = 0
    t[pid == pid[0], 0] = 1  # one patient holds every positive of class c0
    res = bootstrap_metrics(s, t, labels, pid, None, n_boot=200, seed=0)
    assert res["dropped"]["c0"] > 0 and all(np.isfinite(res["macro"]["auroc"]))
    assert np.all(np.isfinite(res["per_class"]["c0"]["auroc"]))


def test_paired_difference_of_identical_methods_is_zero_and_of_better_method_positive():
    s, t, pid, labels = _table(n=400, patients=150)
    same = paired_bootstrap(s, s, t, labels, pid, n_boot=200)
    assert same["diff"] == 0 and same["ci"] == [0, 0]
    rng = np.random.default_rng(5)
    noisy = s + rng.normal(0, 0.6, s.shape)
    better = paired_bootstrap(s, noisy, t, labels, pid, n_boot=500)
    assert better["diff"] > 0 and better["ci"][0] > 0 and better["p"] < 0.01
    assert set(better["per_class"]) == set(labels)
    assert bootstrap_p(np.array([-1.0, 1.0] * 50)) == 1.0


def test_delong_matches_the_1988_formulas_computed_by_hand():
    # DeLong et al. (1988), section 2: psi(X, Y) = 1 if X > Y, 1/2 if equal, 0 else; V10(X_i) = mean_j psi,
    # V01(Y_j) = mean_i psi; S10, S01 the sample covariances; var(A - B) = (S10_AA + S10_BB - 2 S10_AB) / m +
    # (same for S01) / n. Exact rational arithmetic on a small example with ties.
    pos_a, neg_a = [0.9, 0.8, 0.4, 0.7], [0.3, 0.4, 0.6, 0.2, 0.5]
    pos_b, neg_b = [0.6, 0.9, 0.5, 0.5], [0.5, 0.7, 0.2, 0.1, 0.3]

    def psi(x, y):
        return Fraction(1) if x > y else Fraction(1, 2) if x == y else Fraction(0)

    def components(pos, neg):
        v10 = [sum(psi(Fraction(str(x)), Fraction(str(y))) for y in neg) / len(neg) for x in pos]
        v01 = [sum(psi(Fraction(str(x)), Fraction(str(y))) for x in pos) / len(pos) for y in neg]
        return v10, v01

    def cov(u, v):
        mu, mv = sum(u) / len(u), sum(v) / len(v)
        return sum((a - mu) * (b - mv) for a, b in zip(u, v)) / (len(u) - 1)

    (a10, a01), (b10, b01) = components(pos_a, neg_a), components(pos_b, neg_b)
    m, n = len(pos_a), len(neg_a)
    auc_a, auc_b = sum(a10) / m, sum(b10) / m
    var = (cov(a10, a10) + cov(b10, b10) - 2 * cov(a10, b10)) / m + \
          (cov(a01, a01) + cov(b01, b01) - 2 * cov(a01, b01)) / n
    assert auc_a == Fraction(7, 8) and auc_b == Fraction(4, 5)  # by hand: (5+5+2.5+5)/20 and (4+5+3.5+3.5)/20
    labels = np.r_[np.ones(m), np.zeros(n)]
    res = delong_test(np.r_[pos_a, neg_a], np.r_[pos_b, neg_b], labels)
    assert res["auc_a"] == pytest.approx(float(auc_a)) and res["auc_b"] == pytest.approx(float(auc_b))
    assert res["se"] ** 2 == pytest.approx(float(var), rel=1e-12)
    from scipy.stats import norm

    z = float(auc_a - auc_b) / float(var) ** 0.5
    assert res["z"] == pytest.approx(z) and res["p"] == pytest.approx(2 * norm.sf(abs(z)))


def test_delong_variance_agrees_with_a_brute_force_bootstrap_on_random_data():
    rng = np.random.default_rng(1)
    n = 400
    y = (rng.random(n) < 0.35).astype(float)
    latent = rng.normal(size=n) + 1.0 * y
    a, b = latent + rng.normal(0, 0.7, n), latent + rng.normal(0, 1.2, n)
    res = delong_test(a, b, y)
    from medbridge.engine.metrics import auroc

    diffs = []
    for _ in range(1500):  # plain image-level bootstrap, one resample at a time
        idx = rng.integers(0, n, n)
        diffs.append(auroc(a[idx], y[idx]) - auroc(b[idx], y[idx]))
    assert np.std(diffs, ddof=1) == pytest.approx(res["se"], rel=0.12)
    assert res["diff"] == pytest.approx(auroc(a, y) - auroc(b, y))


def test_delong_refuses_a_single_class():
    with pytest.raises(ValueError, match="positives and negatives"):
        delong_test([0.1, 0.2], [0.3, 0.4], [1, 1])


def test_cv_bootstrap_mean_over_folds_and_paired_difference():
    folds = []
    for k in range(3):
        s, t, pid, labels = _table(n=120, patients=40, seed=k, unknown=0)
        rng = np.random.default_rng(10 + k)
        folds.append({"targets": t, "patients": np.char.add(f"f{k}-", pid),
                      "scores": {"good": s, "noisy": s + rng.normal(0, 0.8, s.shape)},
                      "thresholds": {"good": pick_thresholds(s, t, labels), "noisy": None}})
    res = cv_bootstrap(folds, labels, n_boot=300, seed=0)
    fold_auc = [evaluate_scores(f["scores"]["good"], f["targets"], labels)["macro"]["auroc"] for f in folds]
    good = res["methods"]["good"]
    assert good["macro"]["auroc"] == pytest.approx(np.mean(fold_auc))
    assert good["ci"]["macro"]["auroc"][0] < good["macro"]["auroc"] < good["ci"]["macro"]["auroc"][1]
    assert "f1" in good["macro"] and "f1" not in res["methods"]["noisy"]["macro"]
    pair = res["paired"]["good - noisy"]
    assert pair["diff"] > 0 and pair["ci"][0] > 0 and len(pair["fold_diffs"]) == 3


def test_formatting():
    assert fmt_ci(0.7843, [0.7212, 0.8401]) == "78.4 [72.1, 84.0]"
    assert fmt_ci(float("nan"), None) == "-"
    assert fmt_diff({"diff": 0.055, "ci": [0.019, 0.079], "p": 0.004}) == "+5.5 [+1.9, +7.9], p = 0.004"
    assert interval(np.array([np.nan, np.nan])) != interval(np.arange(10.0))
