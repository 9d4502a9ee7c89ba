"""Compare cross-validated runs on their VALIDATION parts only (model selection without touching the test folds).

Each argument is a CV run folder (``medbridge train --cv K`` / ``medbridge demo``) with the same folds, or several
joined by ``+`` (a seed ensemble: their scores averaged); ``RUN:METHOD`` scores a companion saved in the run (e.g.
``runs/odir:linear-probe``) instead of the run's method. For every fold the saved model is loaded and scores the
fold's validation part (the frozen-activation cache is reused); the table gives the mean-over-folds validation
macro AUROC with its fold-stratified patient-bootstrap 95% interval and, for every entry, the paired difference to
the first one with interval and p-value. ``--test`` adds the same on the test folds (for reporting a choice made
on validation, never for making it).

The parts are the first run's. A run trained per image (``data.unit: image``) beside a first run of cases
(``data.unit: case``, same patients in every part: checked) is scored per case by the engine's rule for methods
that score images one by one: the sigmoid of the mean of the case's image logits.

    python benchmarks/validation_compare.py runs/demo runs/mb-epochs6 runs/demo+runs/mb-seed1+runs/mb-seed2
    python benchmarks/validation_compare.py runs/odir-case runs/odir-case:linear-probe runs/odir-eye
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

BACKBONES: dict[tuple, list] = {}


def _config(run: Path) -> dict:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())


def _split_images(path: Path, part: str) -> set[str]:
    """The image paths of one part of a split file (a case's key joins its images with ' + ')."""
    return {p for key in json.loads(path.read_text())[part] for p in key.split(" + ")}


def fold_scores(entry: str, reference: Path, fold: int, part: str, table,
                cache_root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``part`` (val or test) of the reference run's fold and the scores of ``entry``'s saved model."""
    from medbridge.data import load_split
    from medbridge.engine.cases import is_cases
    from medbridge.engine.run import method_scores
    from medbridge.methods.registry import get_method, load_method

    run_name, _, method_name = entry.partition(":")
    run = Path(run_name)
    split_file = reference / "splits" / f"fold-{fold}.json"
    if run != reference and _split_images(run / "splits" / f"fold-{fold}.json", part) != _split_images(split_file,
                                                                                                        part):
        raise ValueError(f"{run}: fold {fold} has other {part} images than {reference}: not the same folds")
    rows = np.asarray(getattr(load_split(split_file, table), part))
    method_name = method_name or _config(run)["method"]
    folder = run / f"fold-{fold}" / get_method(method_name).method_class.folder()
    names = tuple(b["name"] for b in json.loads((folder / "adapter.json").read_text())["backbones"])
    if names not in BACKBONES:  # built once, not for every fold
        from medbridge.backbones import create_backbone

        BACKBONES[names] = [create_backbone(n) for n in names]
    method = load_method(folder, BACKBONES[names])
    if is_cases(table) and _config(run).get("data", {}).get("unit") == "image":
        method.case_views = False  # trained per image: a case is the mean of its images' logits
    done, scores = method_scores(method, table, rows, cache_root, "cpu", workers=0, progress=False)
    if len(done) != len(rows):
        raise ValueError(f"{entry}: fold {fold}: {len(rows) - len(done)} {part} row(s) could not be scored")
    return rows, scores


def common_folds(runs: list[Path], only: list[int] | None = None) -> list[int]:
    """The folds to compare: ``only`` (each must be finished in every run), else those finished in every run
    (all of finished runs; some of a run still going or trained fold by fold with ``train --cv K --folds``)."""
    from medbridge.engine.cv import finished_folds

    done = {run: finished_folds(run) for run in runs}
    for run, folds in done.items():
        missing = [f for f in only or [] if f not in folds]
        if missing:
            raise SystemExit(f"{run}: fold {missing[0]} is not finished (no fold-{missing[0]}/metrics.json); its "
                             f"finished folds: {', '.join(map(str, folds)) or 'none'}")
    chosen = only if only is not None else sorted(set.intersection(*(set(f) for f in done.values())))
    if not chosen:
        raise SystemExit(f"no fold is finished in every run of {', '.join(map(str, runs))} (fold-*/metrics.json)")
    return chosen


def compare(entries: list[str], part: str, n_boot: int, cache_root: Path, only: list[int] | None = None) -> dict:
    from medbridge.engine.benchmark import _run_table
    from medbridge.engine.stats import cv_bootstrap

    first = Path(entries[0].split("+")[0].partition(":")[0])
    table = _run_table(first, no_split_file=True)
    chosen = common_folds([Path(r.partition(":")[0]) for e in entries for r in e.split("+")], only)
    folds = []
    for f in chosen:
        scores, rows0 = {}, None
        for entry in entries:
            parts = [fold_scores(r, first, f, part, table, cache_root) for r in entry.split("+")]
            rows0 = parts[0][0]
            scores[entry] = np.mean([p[1] for p in parts], axis=0)
        folds.append({"targets": table.targets[rows0], "patients": table.patient_ids[rows0], "scores": scores,
                      "thresholds": dict.fromkeys(entries)})
    return cv_bootstrap(folds, table.labels, n_boot, 0, entries)


def markdown_table(res: dict, entries: list[str], n_boot: int, columns: dict[str, dict[str, str]] | None = None
                   ) -> list[str]:
    """Markdown rows of a ``cv_bootstrap`` result: macro AUROC [95% CI], optional extra ``columns`` ({header:
    {entry: text}}), and the paired difference of each entry to the first (none without resamples)."""
    from medbridge.engine.stats import fmt_diff

    columns = columns or {}
    lines = ["| run | macro AUROC | " + "".join(f"{c} | " for c in columns) + "difference [95% CI], p |",
             "|---|---|" + "---|" * len(columns) + "---|"]
    for i, entry in enumerate(entries):
        value = res["methods"][entry]["macro"]["auroc"]
        low, high = res["methods"][entry]["ci"]["macro"]["auroc"] if n_boot else (np.nan, np.nan)
        diff = "-"
        if i and n_boot:
            pair = res["paired"][f"{entries[0]} - {entry}"]  # reference minus entry: turned around
            diff = fmt_diff({"diff": -pair["diff"], "ci": [-pair["ci"][1], -pair["ci"][0]], "p": pair["p"]})
        extra = "".join(f"{col[entry]} | " for col in columns.values())
        lines.append(f"| {entry} | {100 * value:.1f} [{100 * low:.1f}, {100 * high:.1f}] | {extra}{diff} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    from medbridge.engine.features import cache_root_from

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="RUN[:METHOD] CV run folders (first = reference; METHOD: a companion "
                   "saved in the run, default its method); a+b+c = seed ensemble")
    p.add_argument("--test", action="store_true", help="also the test folds (reporting only)")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--cache-dir", help="frozen-activation cache root (default: $MEDBRIDGE_CACHE/features)")
    p.add_argument("--folds", type=lambda v: [int(x) for x in v.split(",")],
                   help="only these folds, e.g. 0 or 0,1 (default: all; a CV run still going: its finished folds)")
    args = p.parse_args(argv)
    cache_root = cache_root_from(args.cache_dir)
    for part in ("val", "test") if args.test else ("val",):
        res = compare(args.runs, part, args.n_boot, cache_root, args.folds)
        print(f"\n{part} parts: mean over {res['folds']} folds of the macro AUROC (%), 95% patient-bootstrap "
              f"interval ({res['n_boot']} draws, seed 0); difference to {args.runs[0]}\n")
        print("\n".join(markdown_table(res, args.runs, args.n_boot)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
