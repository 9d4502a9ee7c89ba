"""Score per-image CV runs per case from their saved test predictions, beside per-case CV runs of the same folds.

Each argument is ``RUN[:METHOD]`` (default: the run's method): CV runs of cases (``data.unit: case``, e.g. ODIR-5K
patients; at least one: the first gives the cases) and CV runs of the same patients' images (``data.unit: image``)
on the same folds. A per-image run's out-of-fold probabilities are combined per case by the engine's rule for
methods that score images one by one (sigmoid of the mean of the images' logits) and scored against the case
labels. The table gives the mean-over-folds test macro AUROC with its fold-stratified patient-bootstrap 95%
interval and the paired difference to the first entry, and, where the dataset names a challenge (ODIR-5K), the
challenge's final score of the pooled out-of-fold scores with its patient-bootstrap interval, as ``cv`` reports
it. Reads only the runs' prediction files (seconds). For reporting a choice made on the validation parts
(``validation_compare.py``), never for making it.

    python benchmarks/cases_from_image_runs.py runs/odir-case runs/odir-case:linear-probe \
        runs/odir-eye runs/odir-eye:linear-probe
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import yaml


def fold_case_scores(entry: str, fold: int, table) -> tuple[np.ndarray, np.ndarray]:
    """Case rows and case scores of one fold of ``entry`` (a per-image run is combined per case)."""
    from medbridge.data.cases import mean_logit
    from medbridge.engine.cv import load_fold_predictions

    run_name, _, method = entry.partition(":")
    run = Path(run_name)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    method = method or cfg["method"]
    folder = run / f"fold-{fold}"
    if cfg.get("data", {}).get("unit") != "image":
        rows, scores, _ = load_fold_predictions(folder, table, method)
        return rows, scores
    image_rows, image_scores, _ = load_fold_predictions(folder, table.images, method)
    where = {r: i for i, r in enumerate(image_rows)}
    case_rows, scores = [], []
    for c, members in enumerate(table.members):
        found = [where[m] for m in members if m >= 0 and m in where]
        if found:
            case_rows.append(c)
            scores.append(mean_logit(image_scores[found]))
    return np.asarray(case_rows), np.asarray(scores)


def compare(entries: list[str], n_boot: int,
            only: list[int] | None = None) -> tuple[dict, list[dict], list[str]]:
    from validation_compare import common_folds  # beside this script

    from medbridge.engine.benchmark import _run_table
    from medbridge.engine.cases import is_cases
    from medbridge.engine.stats import cv_bootstrap

    runs = [Path(e.partition(":")[0]) for e in entries]
    cases = [r for r in runs if yaml.safe_load((r / "config.yaml").read_text()).get("data", {}).get("unit", "auto")
             in ("case", "auto")]  # auto: the dataset's default (ODIR: case), checked on the table below
    if not cases:
        raise SystemExit("no run of cases (data.unit: case) among the arguments: nothing to score per case")
    table = _run_table(cases[0], no_split_file=True)
    if not is_cases(table):
        raise SystemExit(f"{cases[0]}: its table has no cases")
    folds = []
    for f in common_folds(runs, only):
        scored = {e: fold_case_scores(e, f, table) for e in entries}
        rows = scored[entries[0]][0]
        order = {e: {r: i for i, r in enumerate(scored[e][0])} for e in entries}
        for e in entries[1:]:
            if set(order[e]) != set(rows.tolist()):
                raise SystemExit(f"{e}: fold {f} scores other cases than {entries[0]}: not the same folds")
        scores = {e: scored[e][1][[order[e][r] for r in rows]] for e in entries}
        folds.append({"targets": table.targets[rows], "patients": table.patient_ids[rows], "scores": scores,
                      "thresholds": dict.fromkeys(entries)})
    res = cv_bootstrap(folds, table.labels, n_boot, 0, entries)
    return {**res, "challenge_name": table.notes.get("challenge")}, folds, list(table.labels)


def main(argv: list[str] | None = None) -> int:
    from validation_compare import markdown_table  # beside this script

    from medbridge.engine.challenge import challenge_scores
    from medbridge.engine.metrics import evaluate_scores
    from medbridge.engine.stats import fmt_ci

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="RUN[:METHOD] CV runs of the same folds (first = reference)")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--folds", type=lambda v: [int(x) for x in v.split(",")],
                   help="only these folds, e.g. 0 or 0,1 (a CV run still going: its finished folds)")
    args = p.parse_args(argv)
    res, folds, labels = compare(args.runs, args.n_boot, args.folds)
    print(f"test folds, per case: mean over {res['folds']} folds of the macro AUROC (%), 95% patient-bootstrap "
          f"interval ({res['n_boot']} draws, seed 0); difference to {args.runs[0]}\n")
    per_fold = {e: ", ".join(f"{100 * evaluate_scores(f['scores'][e], f['targets'], labels)['macro']['auroc']:.1f}"
                             for f in folds) for e in args.runs}
    columns = {"folds": per_fold}
    pooled = {e: np.concatenate([f["scores"][e] for f in folds]) for e in args.runs}
    challenge = challenge_scores(res.get("challenge_name"), pooled, np.concatenate([f["targets"] for f in folds]),
                                 np.concatenate([f["patients"] for f in folds]), args.n_boot)
    if challenge:  # percent, as the AUROC column
        columns[f"{res['challenge_name'].upper()} final (pooled over these folds)"] = {
            e: fmt_ci(r["final"]["value"], r["final"].get("ci")) for e, r in challenge.items()}
    print("\n".join(markdown_table(res, args.runs, args.n_boot, columns)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
