"""Subgroup results: AUROC and calibration per sex, age band and view position, with patient-bootstrap
intervals, and the gap between groups with its interval.

Each test part (a single run's test split, or every fold of a cross-validation) is scored per group; a group's
metric is the mean over folds (as the headline), its interval comes from the same fold-stratified patient
bootstrap as the headline (patients are drawn once per fold and every group takes its images from that draw,
so the gap between two groups is computed on the same resamples).

Minimum size: a class counts for a group only with at least ``MIN_CASES`` positives and ``MIN_CASES`` negatives
among the group's tested images. All groups of one attribute are compared on the same classes (those that count
in every reported group); a group that would leave no class in common (largest groups are admitted first) is
reported as "too few" instead of a number."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .metrics import evaluate_scores
from .report import readable
from .stats import (
    MIN_CASES,
    _mean_over_folds,
    bootstrap_p,
    fmt_ci,
    fmt_diff,
    fold_seed,
    image_counts_for,
    interval,
    macro_of,
    resampled_metrics,
)

KEYS = ("auroc", "ece", "brier")
AGE_BANDS = ((0, 40, "<40"), (40, 60, "40-59"), (60, 200, "60+"))
SEX_NAMES = {"m": "male", "male": "male", "f": "female", "female": "female"}


def group_columns(meta: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per attribute the table has (sex, age band, view position), the group of each image (None: unknown)."""
    out = {}
    if "sex" in meta and meta["sex"].notna().any():
        out["sex"] = np.array([SEX_NAMES.get(str(v).strip().lower()) if pd.notna(v) else None for v in meta["sex"]],
                              dtype=object)
    if "age" in meta:
        age = pd.to_numeric(meta["age"], errors="coerce").to_numpy(dtype=np.float64)
        if np.isfinite(age).any():
            band = np.full(len(age), None, dtype=object)
            for lo, hi, name in AGE_BANDS:
                band[(age >= lo) & (age < hi)] = name
            out["age"] = band
    if "view" in meta and meta["view"].notna().any():
        out["view"] = np.array([str(v).strip().upper() if pd.notna(v) and str(v).strip() else None
                                for v in meta["view"]], dtype=object)
    return {k: v for k, v in out.items() if any(x is not None for x in v)}


def _order(values: list, groups: list[str]) -> list[str]:
    """Groups by size, largest first (age bands in their natural order)."""
    if all(g in {b[2] for b in AGE_BANDS} for g in groups):
        return [b[2] for b in AGE_BANDS if b[2] in groups]
    return sorted(groups, key=lambda g: (-sum(v == g for v in values), g))


def subgroup_results(folds: list[dict], labels, methods: list[str], n_boot: int, seed: int = 0,
                     min_cases: int = MIN_CASES) -> dict:
    """``folds[k] = {"targets": (n_k, C), "patients": (n_k,), "scores": {method: (n_k, C)},
    "groups": {attribute: (n_k,) group or None}}`` -> per attribute: the compared classes, per group its size,
    "too_few" or per method each metric (mean over folds) with its interval, and the gaps to the first group."""
    labels = list(labels)
    counts = [image_counts_for(f["patients"], n_boot, fold_seed(seed, k)) if n_boot else None
              for k, f in enumerate(folds)]
    out = {}
    for attr in folds[0]["groups"]:
        values = [v for f in folds for v in f["groups"][attr]]
        targets = np.vstack([f["targets"] for f in folds])
        groups = _order(values, sorted({v for v in values if v is not None}))
        in_group = {g: np.array([v == g for v in values]) for g in groups}
        usable = {}
        for g in groups:
            t = targets[in_group[g]]
            usable[g] = {lab for j, lab in enumerate(labels)
                         if (t[:, j] == 1).sum() >= min_cases and (t[:, j] == 0).sum() >= min_cases}
        common, reported = None, []
        for g in sorted(groups, key=lambda g: -in_group[g].sum()):
            trial = usable[g] if common is None else common & usable[g]
            if trial:
                common, reported = trial, reported + [g]
        classes = [lab for lab in labels if lab in (common or set())]
        cols = [labels.index(lab) for lab in classes]
        entry = {"classes": classes, "min_cases": min_cases, "groups": {}, "gaps": {}}
        samples = {}
        for g in groups:
            t = targets[in_group[g]]
            info = {"images": int(in_group[g].sum()),
                    "patients": int(len(np.unique(np.concatenate([np.asarray(f["patients"])[
                        np.array([v == g for v in f["groups"][attr]], dtype=bool)] for f in folds])))),
                    "positives": {lab: int((t[:, labels.index(lab)] == 1).sum()) for lab in classes},
                    "too_few": g not in reported}
            if g in reported:
                for m in methods:
                    point, boot = {k: [] for k in KEYS}, {k: [] for k in KEYS}
                    for k, f in enumerate(folds):
                        rows = np.array([v == g for v in f["groups"][attr]], dtype=bool)
                        if not rows.any():
                            continue
                        s, y = f["scores"][m][rows][:, cols], f["targets"][rows][:, cols]
                        res = evaluate_scores(s, y, classes)
                        for key in KEYS:
                            point[key].append(res["macro"][key] if res["per_class"] else np.nan)
                        if n_boot:
                            mac = macro_of(resampled_metrics(s, y, classes, counts[k][:, rows]))
                            for key in KEYS:
                                boot[key].append(mac[key])
                    info[m] = {}
                    for key in KEYS:
                        v = np.asarray(point[key], dtype=np.float64)
                        info[m][key] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
                        if n_boot:
                            samples[(g, m, key)] = _mean_over_folds(boot[key])
                            info[m][f"{key}_ci"] = interval(samples[(g, m, key)])
            entry["groups"][g] = info
        ref = reported[0] if reported else None
        for g in reported[1:]:
            for m in methods:
                diff = entry["groups"][g][m]["auroc"] - entry["groups"][ref][m]["auroc"]
                gap = {"diff": diff}
                if n_boot:
                    d = samples[(g, m, "auroc")] - samples[(ref, m, "auroc")]
                    gap.update({"ci": interval(d), "p": bootstrap_p(d)})
                entry["gaps"].setdefault(m, {})[f"{g} - {ref}"] = gap
        out[attr] = entry
    return out


def subgroup_markdown(subgroups: dict, methods: list[str]) -> str:
    """Markdown tables: per attribute the groups' macro AUROC and ECE with intervals, and the gaps."""
    if not subgroups:
        return "No subgroup attributes (sex, age, view position) in this dataset."
    lines = []
    for attr, entry in subgroups.items():
        name = {"sex": "Sex", "age": "Age band (years)", "view": "View position"}.get(attr, attr)
        lines += [f"**{name}** — classes compared (at least {entry['min_cases']} positives and negatives in every "
                  f"reported group): {', '.join(readable(c) for c in entry['classes']) or 'none'}.", "",
                  "| group | images | patients | " + " | ".join(f"{m} AUROC | {m} ECE" for m in methods) + " |",
                  "|---|---|---|" + "---|---|" * len(methods)]
        for g, info in entry["groups"].items():
            if info["too_few"]:
                cells = ["too few"] * (2 * len(methods))
            else:
                cells = [c for m in methods for c in (fmt_ci(info[m]["auroc"], info[m].get("auroc_ci")),
                                                       fmt_ci(info[m]["ece"], info[m].get("ece_ci")))]
            lines.append(f"| {g} | {info['images']} | {info['patients']} | " + " | ".join(cells) + " |")
        for m, gaps in entry["gaps"].items():
            for name_gap, gap in gaps.items():
                lines.append(f"\nAUROC gap {name_gap} ({m}): {fmt_diff(gap)}.")
        lines.append("")
    return "\n".join(lines)


__all__ = ["group_columns", "subgroup_results", "subgroup_markdown", "AGE_BANDS"]
