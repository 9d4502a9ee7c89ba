"""Patient-level K-fold cross-validation (engine/cv.py) through the CLI on real NIH images with a tiny CLIP."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from tests.helpers import nih_subset_csv, save_tiny_clip

from medbridge.cli.main import main
from medbridge.data import load_dataset
from medbridge.data.table import DatasetError
from medbridge.engine.cv import cv_splits, patient_folds


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory, nih_sample):
    """``train --cv 3 --with-probe`` on 60 real NIH images (tiny CLIP, 1 epoch, 200 resamples)."""
    root = tmp_path_factory.mktemp("cv")
    data = nih_subset_csv(nih_sample, root / "data" / "labels.csv", n=60)
    backbone = save_tiny_clip(root / "tiny-clip")
    common = ["--data", str(data), "--backbone", backbone, "--quiet", "--n-boot", "200",
              "--set", "train.epochs=1", "--set", f"train.cache_dir={root / 'cache'}", "--set", "train.workers=0",
              "--set", "focal.region_size=512", "--set", "focal.stride=512"]
    out = root / "run"
    assert main(["train", *common, "--cv", "3", "--with-probe", "--out", str(out)]) == 0
    return {"root": root, "data": data, "out": out, "common": common}


@pytest.mark.slow
def test_out_of_fold_predictions_cover_every_image_exactly_once(cv_run):
    out, data = cv_run["out"], cv_run["data"]
    table = pd.read_csv(data)
    for method in ("medbridge", "linear-probe"):
        oof = pd.read_csv(out / f"predictions_oof_{method}.csv")
        assert sorted(oof["image"]) == sorted(table["path"])  # every image once (no duplicates, none missing)
        assert set(oof["fold"]) == {0, 1, 2}
    patients = dict(zip(table["path"], table["patient_id"]))
    folds = {}
    for f in range(3):
        split = json.loads((out / f"fold-{f}" / "split.json").read_text())
        assert split["info"]["kind"] == "cv" and split["val"], "each fold carves a validation part"
        parts = {name: {patients[p] for p in split[name]} for name in ("train", "val", "test")}
        assert not (parts["train"] & parts["test"]) and not (parts["val"] & parts["test"]) \
            and not (parts["train"] & parts["val"])
        folds[f] = parts["test"]
        fold_metrics = json.loads((out / f"fold-{f}" / "metrics.json").read_text())
        assert fold_metrics["methods"]["medbridge"]["thresholds"]  # picked on this fold's validation part
    assert not (folds[0] & folds[1]) and not (folds[1] & folds[2]) and not (folds[0] & folds[2])


@pytest.mark.slow
def test_cv_summary_is_the_mean_over_folds_with_intervals(cv_run, capsys):
    out = cv_run["out"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["protocol"] == "cv" and m["folds"] == 3 and m["scored_images"] == 60
    folds = pd.read_csv(out / "folds.csv")
    for method in ("medbridge", "linear-probe"):
        res = m["methods"][method]
        per_fold = folds[folds["method"] == method]["auroc"]
        assert res["macro"]["auroc"] == pytest.approx(per_fold.mean())
        lo, hi = res["ci"]["macro"]["auroc"]
        assert lo <= res["macro"]["auroc"] <= hi and res["ci"]["n_boot"] == 200
        assert "pooled" in res and "auroc" in res["pooled"]["macro"]
    pair = m["paired"]["medbridge - linear-probe"]
    assert pair["diff"] == pytest.approx(np.mean(pair["fold_diffs"])) and 0 < pair["p"] <= 1
    report = (out / "report.md").read_text()
    assert "Mean over folds" in report and "Pooled out-of-fold" in report and "What the interval means" in report
    assert (out / "roc_curves.png").stat().st_size > 10_000
    per_class = pd.read_csv(out / "per_class.csv")
    assert {"auroc_lo", "auroc_hi", "pooled_auroc"} <= set(per_class.columns)
    capsys.readouterr()
    assert main(["collect", str(out), str(out / "fold-0")]) == 0
    table = capsys.readouterr().out
    assert "| cv3 | medbridge | 1 |" in table and "| split | medbridge | 1 |" in table
    ci = m["methods"]["medbridge"]["ci"]["macro"]["auroc"]
    assert f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" in table
    from medbridge.engine.benchmark import paired_difference

    again = paired_difference(out, "linear-probe", out, "medbridge", n_boot=200)  # from the saved folds
    assert again["diff"] == pytest.approx(-pair["diff"])
    assert again["ci"] == pytest.approx([-c for c in pair["ci"][::-1]])
    assert main(["collect", str(out), "--paired", "--n-boot", "200"]) == 0
    assert "| run:linear-probe | " + f"{-100 * pair['diff']:+.1f}" in capsys.readouterr().out


@pytest.mark.slow
def test_benchmark_cv_reuses_the_folds_cache_and_pairs_methods(cv_run, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["benchmark", *cv_run["common"], "--methods", "medbridge,linear-probe", "--seeds", "0",
                 "--cv", "2", "--out", str(out)]) == 0
    text = (out / "results.md").read_text()
    assert "2-fold patient cross-validation" in text and "| 0 | medbridge - linear-probe |" in text
    assert "| cv2 | medbridge | 1 |" in text and " [" in text


def test_cv_resume_refuses_a_changed_setting_reuses_finished_folds_and_continues_a_fold(cv_run, tmp_path, capsys):
    run = tmp_path / "run"  # its own run: a fold's config names the split file by its path
    argv = ["train", *cv_run["common"], "--cv", "3", "--with-probe", "--out", str(run)]
    assert main(argv) == 0
    argv.append("--resume")
    before = (run / "fold-0" / "predictions_medbridge.csv").read_bytes()
    capsys.readouterr()
    assert main([*argv, "--set", "train.lr=0.001"]) == 2  # the remaining folds would train otherwise
    err = capsys.readouterr().err
    assert "--resume: the configuration differs" in err and "train.lr" in err and len(err.strip().splitlines()) == 1
    interrupted = run / "fold-2"  # its checkpoints kept, its results gone: it continues, it is not wiped
    (interrupted / "metrics.json").unlink()
    (interrupted / "mine.txt").write_text("kept")
    assert main(argv) == 0
    assert (run / "fold-0" / "predictions_medbridge.csv").read_bytes() == before
    assert (interrupted / "metrics.json").is_file() and (interrupted / "mine.txt").read_text() == "kept"


@pytest.mark.slow
def test_folds_run_apart_then_resumed_give_the_same_cv_as_one_run(cv_run, tmp_path, capsys):
    """``--folds`` trains only the named folds of the same patient split; ``--resume`` with the others finishes
    the CV, whose out-of-fold predictions equal those of one uninterrupted run."""
    run = tmp_path / "run"
    argv = ["train", *cv_run["common"], "--cv", "3", "--with-probe", "--out", str(run)]
    capsys.readouterr()
    assert main([*argv, "--folds", "2"]) == 0
    out = capsys.readouterr().out
    assert "1 of 3 folds finished" in out and "--resume --folds 0,1" in out and "fold 2: test macro AUROC" in out
    assert sorted(p.name for p in run.glob("fold-*")) == ["fold-2"] and not (run / "metrics.json").exists()
    assert (json.loads((run / "fold-2" / "split.json").read_text())["test"]
            == json.loads((cv_run["out"] / "fold-2" / "split.json").read_text())["test"])  # the same folds
    common = ["train", *cv_run["common"], "--with-probe", "--out", str(run)]
    for bad, why in ((["--cv", "3", "--folds", "0"], "holds finished folds 2 of a cross-validation: add --resume"),
                     (["--cv", "3", "--folds", "0", "--overwrite"], "would delete the finished folds 2"),
                     (["--cv", "4", "--resume"], "was trained as fold 2 of 3 folds")):
        capsys.readouterr()
        assert main([*common, *bad]) == 2
        err = capsys.readouterr().err
        assert why in err and len(err.strip().splitlines()) == 1, err
    assert (run / "fold-2" / "metrics.json").is_file()  # nothing deleted by the refusals
    assert main([*argv, "--resume", "--folds", "1,0"]) == 0
    for method in ("medbridge", "linear-probe"):
        mine = pd.read_csv(run / f"predictions_oof_{method}.csv").sort_values("image", ignore_index=True)
        whole = pd.read_csv(cv_run["out"] / f"predictions_oof_{method}.csv").sort_values("image", ignore_index=True)
        assert mine["fold"].tolist() == whole["fold"].tolist()
        np.testing.assert_allclose(mine.drop(columns=["image", "fold"]).to_numpy(float),
                                   whole.drop(columns=["image", "fold"]).to_numpy(float), atol=1e-6)
    for bad, why in ((["--cv", "3", "--folds", "3"], "must be in 0..2"), (["--folds", "1"], "--folds needs --cv"),
                     (["--cv", "3", "--folds", "a"], "comma-separated fold numbers")):
        capsys.readouterr()
        assert main(["train", *cv_run["common"], *bad, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert why in err and len(err.strip().splitlines()) == 1, err


def test_bad_fold_counts_and_single_patient(nih_sample, tmp_path):
    table = load_dataset("nih", nih_sample)
    with pytest.raises(DatasetError, match="at least 900 patients"):
        patient_folds(table, 900)
    with pytest.raises(DatasetError, match="integer >= 2"):
        patient_folds(table, 1)
    one = tmp_path / "one.csv"
    frame = pd.read_csv(nih_subset_csv(nih_sample, tmp_path / "x.csv", n=6))
    frame["patient_id"] = "p1"
    frame.to_csv(one, index=False)
    with pytest.raises(DatasetError, match="has 1 patient"):
        patient_folds(load_dataset("csv", one), 2)


def test_folds_are_patient_disjoint_balanced_and_nested_by_label_fraction(nih_sample):
    table = load_dataset("nih", nih_sample)
    folds = patient_folds(table, 5, seed=0)
    sizes = np.bincount(folds)
    assert len(sizes) == 5 and sizes.max() - sizes.min() <= 3
    for f in range(5):
        assert not set(table.patient_ids[folds == f]) & set(table.patient_ids[folds != f])
    full = cv_splits(table, 5, 0)
    tenth = cv_splits(table, 5, 0, label_frac=0.1)
    for a, b in zip(full, tenth):
        assert set(b.train) <= set(a.train) and len(b.train) < 0.2 * len(a.train)
        assert np.array_equal(a.test, b.test) and np.array_equal(a.val, b.val)


def test_cv_lists_a_class_without_positives_in_a_fold():
    from medbridge.engine.stats import cv_bootstrap

    rng = np.random.default_rng(0)
    folds = []
    for k in range(2):
        t = (rng.random((40, 2)) < 0.4).astype(float)
        if k == 1:
            t[:, 1] = 0  # class b has no positive in fold 1's test part
        s = rng.random((40, 2)) + 0.5 * t
        folds.append({"targets": t, "patients": np.arange(40).astype(str), "scores": {"m": s},
                      "thresholds": {"m": None}})
    res = cv_bootstrap(folds, ["a", "b"], n_boot=50)["methods"]["m"]
    assert res["skipped"] == {"fold 1": ["b"]}
    assert np.isfinite(res["per_class"]["b"]["auroc"]) and np.isfinite(res["macro"]["auroc"])


@pytest.mark.slow
def test_predict_and_eval_on_a_cv_folder_use_the_first_folds_model(cv_run, capsys, nih_sample):
    """``medbridge predict/eval CVFOLDER`` (e.g. the demo's run folder) use fold-0's model, thresholds and split."""
    out = cv_run["out"]
    image = str(sorted((nih_sample / "images").glob("*.jpg"))[0])
    capsys.readouterr()
    assert main(["predict", str(out), image, "--json"]) == 0
    via_cv = json.loads(capsys.readouterr().out)[0]
    assert main(["predict", str(out / "fold-0"), image, "--json"]) == 0
    assert via_cv == json.loads(capsys.readouterr().out)[0]
    assert main(["eval", str(out), "--data", str(cv_run["data"]), "--json", "--workers", "0",
                 "--cache-dir", str(cv_run["root"] / "cache")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    fold0 = json.loads((out / "fold-0" / "metrics.json").read_text())["methods"]["medbridge"]
    assert res["n"] == fold0["n"] and res["macro"]["auroc"] == fold0["macro"]["auroc"]
