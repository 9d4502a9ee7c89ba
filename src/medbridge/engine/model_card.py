"""The clinical side of a run folder: calibration before/after, subgroup results and the model-card sections of
report.md (intended use, data and splits, what was trained, calibration, subgroups, limitations, command)."""

from __future__ import annotations

import shlex
import sys

import numpy as np

from .metrics import evaluate_scores
from .stats import MIN_CASES, bootstrap_metrics, fmt_ci, too_small

CAL_KEYS = ("auroc", "brier", "ece")
INTENDED_USE = (
    "**Research use only — not for diagnosis.** This model estimates, for one image, the probability of each of "
    "the labels below, for method comparison by researchers. It is not a medical device and has not been "
    "validated prospectively or on other sites; its thresholds maximise F1 on a validation part and are not "
    "clinical operating points.")


COMMAND: list[str] | None = None  # set by the CLI: the command being run
PROGRAM = __name__.split(".")[0]  # the command's name: the package's (the engine names no method, even by chance)


def command_line() -> str:
    """The command that made the run, as typed (``medbridge ...`` when run through the CLI)."""
    argv = list(COMMAND or sys.argv)
    if argv and (argv[0].endswith((PROGRAM, "__main__.py")) or argv[0] == "-m"):
        argv[0] = PROGRAM
    return shlex.join(argv) if argv else "(not recorded)"


def uncalibrated_metrics(raw: np.ndarray, targets: np.ndarray, labels, patients, n_boot: int, seed) -> dict:
    """AUROC, Brier and ECE of the raw (uncalibrated) scores, with their patient-bootstrap intervals."""
    res = evaluate_scores(raw, targets, labels)
    out = {"macro": {k: res["macro"][k] for k in CAL_KEYS},
           "per_class": {lab: {k: r[k] for k in CAL_KEYS} for lab, r in res["per_class"].items()}}
    if n_boot:
        ci = bootstrap_metrics(raw, targets, labels, patients, None, n_boot, seed)
        out["ci"] = {"macro": {k: ci["macro"][k] for k in CAL_KEYS},
                     "per_class": {lab: {k: v[k] for k in CAL_KEYS} for lab, v in ci["per_class"].items()}}
    return out


def raw_columns(raw: np.ndarray | None, labels) -> dict:
    """Extra prediction columns ``u_<label>``: the scores before calibration (none without a calibrator)."""
    return {} if raw is None else {f"u_{lab}": raw[:, j].astype(np.float64) for j, lab in enumerate(labels)}


def calibration_table(results: dict, kind: str) -> str:
    """Markdown: per method, macro Brier score and ECE (%, 95% interval), before and after calibration."""
    lines = ["| method | probabilities | macro AUROC | macro Brier score | macro ECE |", "|---|---|---|---|---|"]
    for m, r in results.items():
        ci = (r.get("ci") or {}).get("macro", {})
        rows = []
        if r.get("uncalibrated"):
            u = r["uncalibrated"]
            uci = (u.get("ci") or {}).get("macro", {})
            rows.append(("raw (before calibration)", u["macro"], uci))
            rows.append((f"calibrated ({kind}, fitted on validation)", r["macro"], ci))
        else:
            rows.append(("raw (no calibration)", r["macro"], ci))
        for name, mac, c in rows:
            lines.append(f"| {m} | {name} | " + " | ".join(fmt_ci(mac.get(k, float("nan")), c.get(k))
                                                          for k in CAL_KEYS) + " |")
    return "\n".join(lines)


def small_classes(results: dict, counts: dict | None = None) -> list[str]:
    """Classes with fewer than MIN_CASES positives or negatives in a test part (``counts``: {label: (pos, neg)})."""
    if counts is None:
        first = next(iter(results.values()))["per_class"]
        counts = {lab: (r.get("positives", 0), r.get("negatives", r.get("n", 0) - r.get("positives", 0)))
                  for lab, r in first.items()}
    return [lab for lab, (p, n) in counts.items() if too_small(p, n)]


def card_head(title: str, cfg, table, split_text: str, params: dict) -> list[str]:
    """Model card: intended use, data and splits, backbones and what was trained."""
    labels = ", ".join(table.labels)
    trained = "; ".join(f"{m}: {n:,} trainable parameters" for m, n in params.items()) or "-"
    return [f"# {title}", "", "Model card (reporting after CLAIM / TRIPOD+AI). Numbers are percentages with 95% "
            "patient-bootstrap intervals.", "", "## Intended use", "", INTENDED_USE, "", f"Labels: {labels}.", "",
            "## Data and splits", "", f"Dataset {table.name} at `{cfg.data.path}`: {len(table)} "
            f"{'cases (of several images)' if getattr(table, 'unit', 'image') == 'case' else 'images'} of "
            f"{table.meta['patient_id'].nunique()} patients. {split_text} Splits are by patient (no patient in two "
            "parts).", "", "## Model", "",
            f"Frozen backbone(s): {', '.join(cfg.backbones)} (not trained). Trained on top: {trained}. Method "
            f"options: {cfg.method_options or 'defaults'}. Post-hoc calibration: {cfg.eval.calibrate}"
            + (" (per class, fitted on the validation part only, saved in the method's adapter.json)"
               if cfg.eval.calibrate != "none" else "") + ".", ""]


def card_calibration(results: dict, kind: str) -> list[str]:
    return ["## Calibration", "",
            "Brier score: mean squared gap between probability and outcome (lower is better). ECE: expected "
            "calibration error over 10 equal-width probability bins (the mean gap between predicted and observed "
            "frequency; 0 = calibrated). Calibration is monotone per class, so AUROC is unchanged by it.", "",
            calibration_table(results, kind), "", "![Reliability diagram](reliability.png)", ""]


def card_subgroups(markdown: str) -> list[str]:
    return ["## Subgroups", "",
            f"Macro AUROC and ECE per sex, age band and view position (mean over test parts, 95% patient-bootstrap "
            f"interval); a group is compared only on classes with at least {MIN_CASES} positives and {MIN_CASES} "
            "negatives in it, and reported as \"too few\" when none is left. Gaps are to the largest group, on the "
            "same bootstrap draws.", "", markdown, ""]


def card_limitations(results: dict, table, subgroups: dict, test_patients: int, counts: dict | None = None,
                     calibrated: bool = False) -> list[str]:
    small = small_classes(results, counts)
    few = [f"{attr} {g}" for attr, e in subgroups.items() for g, i in e["groups"].items() if i["too_few"]]
    lines = ["## Limitations", "",
             f"- Tested on {test_patients} patients of one dataset ({table.name}); no external validation: "
             "performance on other hospitals, scanners or populations is unknown.",
             "- Labels are the dataset's own (for NIH ChestX-ray14 and CheXpert they are text-mined from reports and "
             "noisy); a metric is only as good as its reference standard."]
    if small:
        lines.append(f"- n too small (fewer than {MIN_CASES} positives or negatives in a test part, no interval "
                     f"shown): {', '.join(small)}. Their AUROC is anecdotal.")
    if few:
        lines.append(f"- Subgroups with too few cases for a number: {', '.join(few)}.")
    if not calibrated:
        lines.append("- Probabilities are not calibrated (see ECE); read them as scores, or refit with "
                     "`--set eval.calibrate=platt`.")
    return lines + [""]


def card_command(extra: str = "") -> list[str]:
    return ["## How this was made", "", "```", command_line(), "```", extra, ""]


__all__ = ["uncalibrated_metrics", "raw_columns", "calibration_table", "card_head", "card_calibration",
           "card_subgroups", "card_limitations", "card_command", "command_line", "INTENDED_USE"]
