"""Calibration, small-sample honesty, subgroups, plain-word decisions and the model card (issue 28)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medbridge.engine.calibration import (
    apply_calibration,
    brier,
    ece,
    fit_calibrator,
    load_calibrator,
    save_calibrator,
    weighted_brier_ece,
)
from medbridge.engine.metrics import auroc, evaluate_scores
from medbridge.engine.stats import MIN_CASES, fmt_class, image_counts_for, too_small
from medbridge.engine.subgroups import group_columns, subgroup_results
from medbridge.io import CorruptFileError
from medbridge.serve.decisions import LOW_PROBABILITY, decide


def calibrated_data(n: int, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scores p ~ U(0, 1) and labels drawn as Bernoulli(p): perfectly calibrated by construction."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(size=(n, classes))
    return p, (rng.uniform(size=p.shape) < p).astype(np.float64)


def test_a_perfectly_calibrated_score_has_ece_near_zero_and_a_distorted_one_does_not():
    p, y = calibrated_data(200_000, 1)
    assert ece(p[:, 0], y[:, 0]) < 0.005
    assert ece(p[:, 0] ** 3, y[:, 0]) > 0.1  # overconfident negatives: far from the diagonal
    assert brier(p[:, 0], y[:, 0]) == pytest.approx(1 / 6, abs=0.003)  # E[p(1-p)] for p ~ U(0, 1)
    assert brier(np.array([1.0, 0.0]), np.array([1.0, 0.0])) == 0.0


def test_weighted_brier_and_ece_equal_recomputing_the_materialised_resample():
    p, y = calibrated_data(60, 1, seed=3)
    counts = image_counts_for(np.arange(60) // 2, 25, seed=1)  # 30 patients of 2 images
    br, ec = weighted_brier_ece(p[:, 0], y[:, 0], counts.astype(np.float64))
    for b in range(25):
        rows = np.repeat(np.arange(60), counts[b])
        assert br[b] == pytest.approx(brier(p[rows, 0], y[rows, 0]), abs=1e-12)
        assert ec[b] == pytest.approx(ece(p[rows, 0], y[rows, 0]), abs=1e-12)


@pytest.mark.parametrize("kind", ["temperature", "platt"])
def test_calibration_never_changes_auroc_and_repairs_a_distorted_score(kind):
    p, y = calibrated_data(4000, 3, seed=1)
    distorted = 1 / (1 + ((1 - p) / p) ** 3)  # sigmoid(3 logit p): same ranking, overconfident
    labels = ["a", "b", "c"]
    cal = fit_calibrator(kind, distorted[:2000], y[:2000], labels)
    fixed = apply_calibration(cal, distorted[2000:], labels)
    for j in range(3):
        assert auroc(fixed[:, j], y[2000:, j]) == auroc(distorted[2000:, j], y[2000:, j])
        assert ece(fixed[:, j], y[2000:, j]) < 0.5 * ece(distorted[2000:, j], y[2000:, j])
    before = evaluate_scores(distorted[2000:], y[2000:], labels)["macro"]
    after = evaluate_scores(fixed, y[2000:], labels)["macro"]
    assert after["auroc"] == before["auroc"] and after["ece"] < before["ece"]


def test_a_class_without_validation_positives_keeps_the_identity_and_unknown_targets_are_skipped():
    p, y = calibrated_data(300, 2, seed=2)
    y[:, 1] = 0
    y[:50, 0] = np.nan
    cal = fit_calibrator("platt", p, y, ["a", "b"])
    assert cal["params"]["b"] == [1.0, 0.0] and cal["identity"] == ["b"]
    np.testing.assert_array_equal(apply_calibration(cal, p, ["a", "b"])[:, 1], p[:, 1])
    with pytest.raises(ValueError, match="eval.calibrate: 'isotonic' is not one of none, temperature, platt"):
        fit_calibrator("isotonic", p, y, ["a", "b"])


def test_saved_calibrator_round_trips_and_a_tampered_one_is_refused(tmp_path):
    (tmp_path / "adapter.json").write_text(json.dumps({"format": 1, "method": "x"}))
    p, y = calibrated_data(500, 2)
    cal = fit_calibrator("platt", p ** 2, y, ["a", "b"])
    save_calibrator(tmp_path, cal)
    assert load_calibrator(tmp_path, ["a", "b"]) == cal
    meta = json.loads((tmp_path / "adapter.json").read_text())
    meta["calibration"]["params"]["a"][0] = 2.5
    (tmp_path / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptFileError, match="adapter.json: field 'calibration' does not match its digest"):
        load_calibrator(tmp_path, ["a", "b"])


def test_n_too_small_replaces_the_interval_below_the_documented_minimum():
    assert MIN_CASES == 5  # docs/engine.md states this number
    assert too_small(MIN_CASES - 1, 100) and too_small(100, MIN_CASES - 1) and not too_small(MIN_CASES, MIN_CASES)
    assert fmt_class(0.62, [0.0, 1.0], 1, 100) == "62.0 (n too small: 1 positive)"
    assert fmt_class(0.62, [0.0, 1.0], 100, 3) == "62.0 (n too small: 3 negatives)"
    assert fmt_class(0.62, [0.5, 0.7], 5, 5) == "62.0 [50.0, 70.0]"


def _folds(n_folds: int = 2, per_fold: int = 400, seed: int = 0) -> list[dict]:
    """Synthetic folds: a model that separates well for women and not at all for men; 6 images of age 30."""
    rng = np.random.default_rng(seed)
    folds = []
    for k in range(n_folds):
        y = (rng.uniform(size=(per_fold, 2)) < 0.3).astype(np.float64)
        sex = np.where(np.arange(per_fold) % 2 == 0, "female", "male").astype(object)
        noise = rng.uniform(size=y.shape)
        scores = np.where((sex == "female")[:, None], 0.7 * y + 0.3 * noise, noise)
        age = np.where(np.arange(per_fold) < 6, "<40", "60+").astype(object)
        folds.append({"targets": y, "patients": np.array([f"{k}-{i // 2}" for i in range(per_fold)]),
                      "scores": {"m": scores}, "groups": {"sex": sex, "age": age}})
    return folds


def test_subgroups_find_a_real_gap_with_its_interval_and_call_a_tiny_group_too_few():
    res = subgroup_results(_folds(), ["a", "b"], ["m"], n_boot=200, seed=0)
    sex = res["sex"]
    assert sex["classes"] == ["a", "b"]
    women, men = sex["groups"]["female"]["m"], sex["groups"]["male"]["m"]
    assert women["auroc"] > 0.95 and abs(men["auroc"] - 0.5) < 0.1
    gap = sex["gaps"]["m"]["male - female"]  # to the largest group (a tie in size: alphabetical)
    assert gap["diff"] == pytest.approx(men["auroc"] - women["auroc"])
    assert gap["ci"][1] < 0 and gap["p"] < 0.05
    age = res["age"]["groups"]
    assert age["<40"]["too_few"] and "m" not in age["<40"] and not age["60+"]["too_few"]


def test_subgroup_gap_of_identical_groups_is_zero():
    folds = _folds()
    for f in folds:  # both sexes get the same (perfect) scores: no gap, on the same bootstrap draws
        f["scores"]["m"] = 0.7 * f["targets"] + 0.3 * np.linspace(0, 1, len(f["targets"]))[:, None]
        f["groups"]["sex"] = np.where(np.arange(len(f["targets"])) < 200, "female", "male").astype(object)
        f["targets"][200:] = f["targets"][:200]
        f["scores"]["m"][200:] = f["scores"]["m"][:200]
    gap = subgroup_results(folds, ["a", "b"], ["m"], n_boot=50)["sex"]["gaps"]["m"]
    assert list(gap.values())[0]["diff"] == pytest.approx(0.0, abs=1e-12)


def test_group_columns_read_sex_age_bands_and_view():
    import pandas as pd

    meta = pd.DataFrame({"sex": ["M", "F", None], "age": [35, 59, "x"], "view": ["pa", "AP", ""]})
    cols = group_columns(meta)
    assert list(cols["sex"]) == ["male", "female", None]
    assert list(cols["age"]) == ["<40", "40-59", None]
    assert list(cols["view"]) == ["PA", "AP", None]


def test_decisions_are_explained_in_plain_words():
    none = decide(0.3, float("inf"))
    assert not none["positive"] and none["reason"] == ("no threshold: this label was never positive in validation, "
                                                       "shown as probability only")
    low = decide(0.062, 0.007)
    assert low["positive"] and low["decision"] == "flagged (low probability)" and "6.2 %" in low["reason"]
    assert "weak signal" in low["reason"] and LOW_PROBABILITY > 0.062
    assert decide(0.8, 0.4)["decision"] == "positive" and decide(0.3, 0.4)["decision"] == "negative"
    assert "default threshold" in decide(0.6, 0.5, validated=False)["reason"]


def test_config_refuses_an_unknown_calibration():
    from medbridge.engine.config import ConfigError, load_config

    assert load_config(None, None, ["eval.calibrate=platt"]).eval.calibrate == "platt"
    with pytest.raises(ConfigError, match="eval.calibrate: 'isotonic' is not one of none, temperature, platt"):
        load_config(None, None, ["eval.calibrate=isotonic"])


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory, nih_sample):
    """``train --with-probe --set eval.calibrate=platt`` on 60 real NIH images with a tiny CLIP; records the rows
    every calibrator was fitted on."""
    from tests.helpers import nih_subset_csv, save_tiny_clip

    import medbridge.engine.calibration as calibration
    from medbridge.cli.main import main

    root = tmp_path_factory.mktemp("calibrated")
    data = nih_subset_csv(nih_sample, root / "data" / "labels.csv", n=60)
    backbone = save_tiny_clip(root / "tiny-clip")
    fitted, fit = [], calibration.fit_calibrator

    def spy(kind, scores, targets, labels):
        fitted.append(np.array(targets))
        return fit(kind, scores, targets, labels)

    argv = ["train", "--data", str(data), "--backbone", backbone, "--out", str(root / "run"), "--with-probe",
            "--quiet", "--n-boot", "100", "--set", "train.epochs=1", "--set", f"train.cache_dir={root / 'cache'}",
            "--set", "train.workers=0", "--set", "focal.region_size=512", "--set", "focal.stride=512",
            "--set", "eval.calibrate=platt"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(calibration, "fit_calibrator", spy)
        assert main(argv) == 0
    return {"root": root, "data": data, "out": root / "run", "fitted": fitted}


def test_calibrator_is_fitted_on_validation_rows_only_and_keeps_auroc(calibrated_run):
    from medbridge.data import load_dataset, load_split

    out = calibrated_run["out"]
    table = load_dataset("csv", calibrated_run["data"])
    split = load_split(out / "split.json", table)
    assert len(calibrated_run["fitted"]) == 2  # medbridge and the linear probe
    for targets in calibrated_run["fitted"]:
        np.testing.assert_array_equal(targets, table.targets[split.val])
    metrics = json.loads((out / "metrics.json").read_text())
    for name, res in metrics["methods"].items():
        assert res["uncalibrated"]["macro"]["auroc"] == pytest.approx(res["macro"]["auroc"], abs=1e-12), name
        assert set(res["uncalibrated"]["ci"]["macro"]) == {"auroc", "brier", "ece"}
    assert load_calibrator(out / "medbridge", metrics["labels"])["kind"] == "platt"


def test_eval_and_predict_apply_the_saved_calibrator(calibrated_run, capsys, tmp_path):
    import pandas as pd

    from medbridge.cli.main import main

    out = calibrated_run["out"]
    cache = str(calibrated_run["root"] / "cache")
    assert main(["eval", str(out), "--data", str(calibrated_run["data"]), "--json", "--cache-dir", cache,
                 "--workers", "0"]) == 0
    res = json.loads(capsys.readouterr().out)
    run = json.loads((out / "metrics.json").read_text())["methods"]["medbridge"]
    assert res["calibration"] == "platt"
    for key in ("auroc", "brier", "ece", "f1"):
        assert res["macro"][key] == pytest.approx(run["macro"][key], abs=1e-6), key
    preds = pd.read_csv(out / "predictions_medbridge.csv")
    image = calibrated_run["data"].parent / preds["image"][0]
    assert main(["predict", str(out), str(image), "--out", str(tmp_path / "p.csv")]) == 0
    got = pd.read_csv(tmp_path / "p.csv")
    labels = [c[2:] for c in preds.columns if c.startswith("p_")]
    now = got[[f"p_{lab}" for lab in labels]].to_numpy()[0]
    calibrated = preds[[f"p_{lab}" for lab in labels]].to_numpy()[0]
    raw = preds[[f"u_{lab}" for lab in labels]].to_numpy()[0]
    np.testing.assert_allclose(now, calibrated, atol=1e-3)  # from the image file, not the (float16) cache
    assert np.abs(raw - calibrated).max() > 1e-2  # calibration did change the scores


def test_report_is_a_model_card_with_calibration_subgroups_and_figures(calibrated_run):
    out = calibrated_run["out"]
    report = (out / "report.md").read_text()
    for section in ("## Intended use", "Research use only", "## Data and splits", "## Model", "## Metrics",
                    "## Calibration", "## Subgroups", "## Limitations", "## How this was made", "eval.calibrate=platt"):
        assert section in report, section
    assert "| medbridge | raw (before calibration) |" in report
    for name in ("roc_curves.png", "roc_curves.svg", "reliability.png", "reliability.svg"):
        assert (out / name).stat().st_size > 10_000, name
    from PIL import Image

    with Image.open(out / "roc_curves.png") as im:
        assert im.info["dpi"][0] == pytest.approx(300, abs=1)  # print resolution
    assert "1 − specificity" in (out / "roc_curves.svg").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert "view" in metrics["subgroups"]
