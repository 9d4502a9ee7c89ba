"""The reporting scripts under ``benchmarks/`` that read CV run folders: ``cases_from_image_runs.py`` scores a
per-image run per case exactly as the engine scores a case (mean logit), pairs it with per-case runs of the same
folds, restricts to ``--folds`` and adds the dataset's challenge score; runs of other folds are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests.helpers import odir_subset

from medbridge.data.cases import mean_logit
from medbridge.engine.config import DataConfig, RunConfig, save_config
from medbridge.engine.report import write_predictions

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import cases_from_image_runs

    return cases_from_image_runs


def fake_cv(out: Path, data: Path, unit: str, fold_rows: list[np.ndarray], scores_of) -> Path:
    """A CV run folder as ``medbridge train --cv`` leaves it (config, per-fold metrics and predictions), with the
    scores ``scores_of(rows)`` for the given rows of its table (cases or images)."""
    from medbridge.engine.benchmark import _run_table

    out.mkdir(parents=True)
    save_config(RunConfig(data=DataConfig(path=str(data), format="odir", unit="case")), out / "config.yaml")
    table = _run_table(out, no_split_file=True)  # the cases; their images are the rows of a per-image run
    table = table if unit == "case" else table.images
    save_config(RunConfig(data=DataConfig(path=str(data), format="odir", unit=unit)), out / "config.yaml")
    paths = table.relative_paths()
    for f, rows in enumerate(fold_rows):
        folder = out / f"fold-{f}"
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps({"methods": {"medbridge": {"thresholds": None}}}))
        write_predictions(folder / "predictions_medbridge.csv", [paths[r] for r in rows], table.labels,
                          scores_of(rows), {})
    return out


@pytest.fixture(scope="module")
def odir40(odir_sample, tmp_path_factory):
    return odir_subset(odir_sample, tmp_path_factory.mktemp("odir40") / "odir", n=40)


def test_a_per_image_run_is_scored_per_case_by_the_mean_logit_and_folds_can_be_chosen(scripts, odir40, tmp_path,
                                                                                       capsys):
    from medbridge.engine.benchmark import _run_table

    save_config(RunConfig(data=DataConfig(path=str(odir40), format="odir", unit="case")), tmp_path / "config.yaml")
    table = _run_table(tmp_path, no_split_file=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(table))
    folds = [np.sort(order[:20]), np.sort(order[20:])]
    eye_logits = rng.normal(size=(len(table.images), len(table.labels)))
    eye_probs = 1 / (1 + np.exp(-eye_logits))

    def from_eyes(case_rows):  # the engine's rule for a method that scores images one by one
        return np.stack([mean_logit(eye_probs[[m for m in table.members[c] if m >= 0]]) for c in case_rows])

    eye_folds = [np.sort(np.concatenate([[m for m in table.members[c] if m >= 0] for c in rows])) for rows in folds]
    case_run = fake_cv(tmp_path / "cases", odir40, "case", folds, from_eyes)
    eye_run = fake_cv(tmp_path / "eyes", odir40, "image", eye_folds, lambda rows: eye_probs[rows])
    noise = fake_cv(tmp_path / "noise", odir40, "case", folds, lambda rows: rng.uniform(size=(len(rows), 8)))

    res, scored, _ = scripts.compare([str(case_run), str(eye_run), str(noise)], 200)
    assert res["folds"] == 2 and len(scored) == 2
    for fold in scored:  # the per-eye run's case scores are the case run's, up to the 9 digits written
        np.testing.assert_allclose(fold["scores"][str(eye_run)], fold["scores"][str(case_run)], atol=1e-8)
    assert scripts.compare([str(case_run), str(eye_run)], 200, [1])[0]["folds"] == 1

    assert scripts.main([str(case_run), str(eye_run), str(noise), "--n-boot", "200", "--folds", "0"]) == 0
    out = capsys.readouterr().out
    assert "mean over 1 folds" in out and "ODIR final (pooled over these folds)" in out
    cells = {run: next(line for line in out.splitlines() if f"| {run} |" in line).split(" | ")
             for run in (case_run, eye_run, noise)}
    assert cells[eye_run][1:4] == cells[case_run][1:4] != cells[noise][1:4], out  # AUROC, folds, ODIR final
    assert cells[eye_run][4].startswith("+0.0 [+0.0, +0.0], p = 1.000"), out


def test_runs_of_other_folds_and_runs_without_cases_are_refused(scripts, odir40, tmp_path):
    whole = np.arange(40)
    case_run = fake_cv(tmp_path / "a", odir40, "case", [whole[:20], whole[20:]],
                       lambda rows: np.full((len(rows), 8), 0.5))
    shifted = fake_cv(tmp_path / "b", odir40, "case", [whole[:19], whole[19:]],
                      lambda rows: np.full((len(rows), 8), 0.5))
    with pytest.raises(SystemExit, match="fold 0 scores other cases than .*: not the same folds"):
        scripts.compare([str(case_run), str(shifted)], 50)
    one_fold = fake_cv(tmp_path / "d", odir40, "case", [whole[20:]], lambda rows: np.full((len(rows), 8), 0.5))
    (one_fold / "fold-0").rename(one_fold / "fold-1")  # only fold 1 of 2 finished (a CV trained with --folds 1)
    assert scripts.compare([str(case_run), str(one_fold)], 50)[0]["folds"] == 1  # the folds both runs have
    with pytest.raises(SystemExit, match=r"d: fold 0 is not finished \(no fold-0/metrics.json\); its finished "
                                         "folds: 1"):
        scripts.compare([str(case_run), str(one_fold)], 50, [0])
    eyes = fake_cv(tmp_path / "c", odir40, "image", [np.arange(80)], lambda rows: np.full((len(rows), 8), 0.5))
    with pytest.raises(SystemExit, match="no run of cases"):
        scripts.compare([str(eyes)], 50)
