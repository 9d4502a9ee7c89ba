"""Patient bootstrap, paired comparison and DeLong's test (engine/stats.py)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from medbridge.engine.calibration import weighted_brier_ece
from medbridge.engine.metrics import evaluate_scores, pick_thresholds
from medbridge.engine.stats import (
    bootstrap_metrics,
    bootstrap_p,
    cv_bootstrap,
    delong_covariance,
    delong_per_class,
    delong_test,
    draw_patients,
    fmt_ci,
    fmt_diff,
    image_counts_for,
    interval,
    macro_of,
    paired_bootstrap,
    patient_inverse,
    recentred,
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
    assert fmt_diff({"diff": -1e-9, "ci": [-0.0004, 0.0004], "p": 1.0}) == "+0.0 [+0.0, +0.0], p = 1.000"
    assert fmt_diff({"diff": -0.0006, "ci": [-0.02, 0.0]}) == "-0.1 [-2.0, +0.0]"
    assert interval(np.array([np.nan, np.nan])) != interval(np.arange(10.0))


# ----- DeLong against published results: pROC's aSAH example -----
# Data: 113 patients with aneurysmal subarachnoid haemorrhage, outcome Good/Poor at 6 months, WFNS grade, S100B and
# NDKA at admission (Turck et al., Intensive Care Med 2010;36:107-115), published as the data set `aSAH` of the R
# package pROC (Robin et al., BMC Bioinformatics 2011;12:77), in pROC's row order. Transcribed from a public CSV copy
# of pROC's data/aSAH.RData (github.com/hedglinnolan/tabular-ml-lab, turbotab/core/tests/acceptance/asah.py); its
# first six rows equal pROC's printed `head(aSAH)`, and it has pROC's printed "72 controls (Good) < 41 cases (Poor)".
# G = Good (negative), P = Poor (positive).
ASAH_OUTCOME = (
    "GGGGPPGPGGPGPPGGPGPPPGPGGGGGGGGGPGGPPGPPGGGGGGGGGPPGGGPGG"
    "GPGPGGPPPGPPGPPPPGGGPPGPGGGGGGPGGGGGGGGGGGGPPPPPPGGGPGGG"
)
ASAH_AGE = (
    "42 37 42 27 42 48 57 41 49 75 37 49 49 71 64 49 63 33 51 54 78 47 56 76 58 50 36 43 61 31 58 61 76 54 55 57 "
    "64 67 71 74 72 62 65 50 51 50 35 44 45 48 61 36 53 66 73 58 31 28 32 36 47 29 46 73 45 40 50 57 37 60 53 57 "
    "56 31 59 66 50 54 55 51 44 45 47 57 29 52 18 68 47 45 34 60 33 38 48 67 64 70 24 74 42 63 81 62 33 51 29 68 "
    "53 58 32 39 34"
)
ASAH_WFNS = (
    "1 1 1 1 3 2 5 4 1 2 5 2 5 5 1 2 5 2 2 5 2 1 1 1 1 2 1 2 1 1 3 4 2 1 4 5 4 1 4 2 5 5 1 1 2 4 1 1 2 5 5 2 1 2 "
    "5 1 2 2 2 1 5 1 1 2 5 2 1 4 5 2 4 4 1 4 1 2 1 4 2 1 2 3 2 4 2 1 4 5 1 1 5 4 2 2 1 1 1 3 1 2 5 2 2 5 5 5 2 4 "
    "4 5 1 1 1"
)
ASAH_S100B = (
    "0.13 0.14 0.1 0.04 0.13 0.1 0.47 0.16 0.18 0.1 0.12 0.1 0.44 0.71 0.04 0.08 0.49 0.04 0.07 0.33 0.09 0.09 "
    "0.07 0.11 0.07 0.17 0.07 0.11 0.13 0.19 0.05 0.16 0.41 0.14 0.34 0.35 0.48 0.09 0.96 0.25 0.5 0.46 0.16 0.07 "
    "0.43 0.45 0.11 0.08 0.09 0.86 0.52 0.08 0.06 0.13 2.07 0.1 0.14 0.15 0.07 0.06 0.77 0.05 0.09 0.3 0.03 0.09 "
    "0.04 0.23 0.7 0.09 0.27 0.71 0.08 0.26 0.08 0.16 0.09 0.13 0.1 0.08 0.11 0.33 0.11 0.28 0.07 0.1 0.32 0.22 "
    "0.07 0.05 0.24 0.38 0.1 0.15 0.08 0.14 0.1 0.07 0.04 0.19 0.56 0.14 0.58 0.32 0.82 0.74 0.15 0.47 0.17 0.44 "
    "0.15 0.5 0.48"
)
ASAH_NDKA = (
    "3.01 8.54 8.09 10.42 17.4 12.75 6 13.2 15.54 6.01 15.96 17.86 5.18 8.9 13.41 20.75 11.6 16.11 32.37 54.82 "
    "32.41 49.94 40.34 9.47 6.29 12.53 6.54 6.3 80.3 12.8 9.8 9.81 9.85 18.21 5.03 14.04 21.93 8.02 7.42 8.38 "
    "6.59 9.63 13.12 7.96 14.34 41.43 7.63 7.06 12.59 13.56 3.87 9.44 7.66 12.98 419.19 27.19 22.27 9.95 21.22 "
    "11.73 10.4 58.83 6.39 11.09 12.22 13.67 17.21 22.63 12.9 9.7 21.57 8.23 72.57 15.54 10.51 10.6 14.57 5.19 "
    "9.63 4.61 21.48 17.3 12.71 9.44 11.07 19.46 10.83 5.37 11.97 7.75 9.83 10.55 28.49 8.53 12.57 12.9 46.83 "
    "11.68 12.67 9.01 9.57 34.06 11.72 14.26 47.61 11.67 24.58 10.33 13.87 15.89 22.43 6.79 13.45"
)

# pROC's published results on aSAH (its reference outputs, github.com/xrobin/pROC tests/testthat/test-auc.R,
# test-var.R, test-cov.R, test-roc.test.R, all with pROC's defaults: roc(aSAH$outcome, marker), DeLong, paired,
# two-sided). roc.test(a, b) tests AUC(a) - AUC(b).
PROC_AUC = {"wfns": 0.823678861788618, "ndka": 0.611957994579946}
PROC_VAR = {"wfns": 0.00146991470882363, "ndka": 0.0031908105493913, "s100b": 0.00266868245717244}
PROC_COV = {("wfns", "ndka"): -0.000532967856762438, ("ndka", "s100b"): -0.000756164938056579,
            ("s100b", "wfns"): 0.00119615567376754}
PROC_ROC_TEST = {  # (a, b): Z, two-sided p, 95% CI of AUC(a) - AUC(b)
    ("wfns", "s100b"): (2.20898359144091, 0.0271757822291882, (0.0104061769564846, 0.174214419249478)),
    ("wfns", "ndka"): (2.79777591868904, 0.00514557970691098, (0.0634011709339876, 0.3600405634833566)),
    ("ndka", "s100b"): (-1.39077002573558, 0.164295175223054, (-0.2876917446341914, 0.0488706064228094)),
}


def _asah():
    y = np.array([c == "P" for c in ASAH_OUTCOME], dtype=float)
    cols = {name: np.array(text.split(), dtype=float) for name, text in
            (("age", ASAH_AGE), ("wfns", ASAH_WFNS), ("s100b", ASAH_S100B), ("ndka", ASAH_NDKA))}
    assert len(y) == 113 and y.sum() == 41 and all(len(v) == 113 for v in cols.values())
    return y, cols


def test_delong_auc_variances_and_covariances_equal_procs_on_asah():
    y, cols = _asah()
    names = ["wfns", "ndka", "s100b"]
    aucs, cov = delong_covariance([cols[k] for k in names], y)
    for i, k in enumerate(names):
        assert cov[i, i] == pytest.approx(PROC_VAR[k], rel=1e-9), k
        if k in PROC_AUC:
            assert aucs[i] == pytest.approx(PROC_AUC[k], abs=1e-12), k
    for (a, b), want in PROC_COV.items():
        assert cov[names.index(a), names.index(b)] == pytest.approx(want, rel=1e-9), (a, b)
    # pROC prints "Area under the curve: 0.8237 / 0.612 / 0.7314" and, for ci(roc(outcome ~ s100b)),
    # "95% CI: 0.6301-0.8326 (DeLong)" (AUC -/+ 1.96 DeLong standard errors).
    assert (round(aucs[0], 4), round(aucs[1], 3), round(aucs[2], 4)) == (0.8237, 0.612, 0.7314)
    half = 1.959963984540054 * np.sqrt(cov[2, 2])
    assert (round(aucs[2] - half, 4), round(aucs[2] + half, 4)) == (0.6301, 0.8326)
    single_auc, single_var = delong_covariance(cols["s100b"], y)  # one curve alone: same variance
    assert single_auc[0] == aucs[2] and single_var[0, 0] == pytest.approx(cov[2, 2], rel=1e-12)


def test_delong_test_equals_procs_roc_test_on_asah():
    from scipy.stats import norm

    y, cols = _asah()
    for (a, b), (z, p, ci) in PROC_ROC_TEST.items():
        res = delong_test(cols[a], cols[b], y)
        assert res["z"] == pytest.approx(z, rel=1e-9), (a, b)
        assert res["p"] == pytest.approx(p, rel=1e-9), (a, b)
        half = norm.ppf(0.975) * res["se"]
        assert (res["diff"] - half, res["diff"] + half) == pytest.approx(ci, rel=1e-9), (a, b)
        swapped = delong_test(cols[b], cols[a], y)
        assert swapped["z"] == pytest.approx(-z, rel=1e-12) and swapped["p"] == pytest.approx(p, rel=1e-12)
    # A third-party printout of pROC (blog.csdn.net/weixin_43935907/article/details/123599869, R 4.0.5):
    # roc.test(roc(outcome ~ age), roc(outcome ~ s100b)) -> "Z = -1.7604, p-value = 0.07835",
    # "AUC of roc1 0.6150068, AUC of roc2 0.7313686". Age has many ties (52 distinct values in 113 patients).
    res = delong_test(cols["age"], cols["s100b"], y)
    assert round(res["z"], 4) == -1.7604 and round(res["p"], 5) == 0.07835
    assert (round(res["auc_a"], 7), round(res["auc_b"], 7)) == (0.6150068, 0.7313686)


def test_delong_per_class_reproduces_procs_three_comparisons_and_skips_a_one_sided_class():
    y, cols = _asah()
    pairs = list(PROC_ROC_TEST)
    scores_a = np.column_stack([cols[a] for a, _ in pairs] + [cols["age"]])
    scores_b = np.column_stack([cols[b] for _, b in pairs] + [cols["s100b"]])
    targets = np.column_stack([y] * len(pairs) + [np.zeros_like(y)])  # last class: no positive
    targets[:20, 1] = np.nan  # unknown labels of class 1: the test runs on the other 93 patients
    labels = ["wfns-s100b", "wfns-ndka", "ndka-s100b", "no positive"]
    res = delong_per_class(scores_a, scores_b, targets, labels)
    assert list(res) == labels[:3]
    for lab, (z, p, _) in zip(labels[::2], [PROC_ROC_TEST[pairs[0]], PROC_ROC_TEST[pairs[2]]]):
        assert res[lab]["z"] == pytest.approx(z, rel=1e-9) and res[lab]["p"] == pytest.approx(p, rel=1e-9)
    subset = delong_test(cols["wfns"][20:], cols["ndka"][20:], y[20:])
    assert res["wfns-ndka"] == subset and res["wfns-ndka"]["positives"] + res["wfns-ndka"]["negatives"] == 93


def test_delong_covariance_rejects_scores_of_the_wrong_length():
    with pytest.raises(ValueError, match="one score per label"):
        delong_covariance([[0.1, 0.2, 0.3], [0.1, 0.2]], [1, 0, 1])


def test_ece_interval_is_centred_on_the_point_estimate_with_the_plain_spread():
    # calibrated by construction (label ~ Bernoulli(score)), 12 classes: the resampled ECE is biased upward, so
    # the plain percentile interval of the macro ECE lies wholly above the point estimate
    rng = np.random.default_rng(0)
    n, labels = 400, [f"c{j}" for j in range(12)]
    s = rng.random((n, len(labels))) * 0.3
    t = (rng.random(s.shape) < s).astype(float)
    pid = np.arange(n).astype(str)
    point = evaluate_scores(s, t, labels)
    res = bootstrap_metrics(s, t, labels, pid, n_boot=400, seed=0)
    counts = image_counts_for(pid, 400, 0).astype(np.float64)  # the same draws as bootstrap_metrics
    plain = np.stack([weighted_brier_ece(s[:, j], t[:, j], counts)[1] for j in range(len(labels))], 1)
    assert interval(plain.mean(1))[0] > point["macro"]["ece"]  # the defect this guards against
    lo, hi = res["macro"]["ece"]
    assert lo < point["macro"]["ece"] < hi
    for j, lab in enumerate(labels):
        raw = interval(plain[:, j])
        lo, hi = res["per_class"][lab]["ece"]
        assert lo <= point["per_class"][lab]["ece"] <= hi
        if lo > 0:  # not floored: same spread, shifted
            assert hi - lo == pytest.approx(raw[1] - raw[0], abs=1e-12)


def test_recentred_keeps_nan_resamples_and_floors_at_zero():
    out = recentred(np.array([0.3, np.nan, 0.1, 0.2]), 0.05)
    assert np.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2, 3]], [0.15, 0.0, 0.05])
    assert np.isnan(recentred(np.array([np.nan, np.nan]), 0.1)).all()
