"""Patient-level K-fold cross-validation: one run folder with a sub-run per fold, out-of-fold predictions for
every image, and the mean over folds as the primary result (with a patient bootstrap stratified by fold).

Each fold's test part is one K-th of the PATIENTS; a validation part is carved from the other patients (by
patient, ``data.fractions`` val/(train+val) of them) to pick thresholds and for model selection; a label fraction
applies to the remaining training patients. Every fold is an ordinary ``train_run`` on a saved split file, so
the frozen-activation cache (keyed by content, not by split) is built once and reused by all folds.

Pooled out-of-fold scores mix K models' calibrations; they are reported, labelled "pooled", beside the mean over
folds, never instead of it."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ..data.cases import CaseTable
from ..data.splits import Split, label_fraction, patient_split, save_split
from ..data.table import DatasetError, ImageTable
from ..io import atomic_write_bytes
from .config import RunConfig, config_from_dict, save_config
from .metrics import evaluate_scores
from .report import ci_sentence, paired_table, plot_reliability, plot_roc, summary_table, write_json
from .stats import (
    DEFAULT_N_BOOT,
    MIN_CASES,
    bootstrap_metrics,
    cv_bootstrap,
    delong_per_class,
    fmt_ci,
    fmt_class,
    fmt_diff,
    fmt_p,
    paired_bootstrap,
    too_small,
    verdict,
)

log = logging.getLogger(__name__)
BOOT_SEED = 0


def patient_folds(table: ImageTable, k: int, seed: int = 0) -> np.ndarray:
    """Fold (0..k-1) of every image: patients are shuffled with ``seed`` and dealt, largest first, to the fold
    with the fewest images so far, so folds are patient-disjoint and close in size."""
    if int(k) != k or k < 2:
        raise DatasetError(f"--cv K: K must be an integer >= 2 (number of folds), got {k}")
    patients, inverse, counts = np.unique(table.patient_ids, return_inverse=True, return_counts=True)
    if len(patients) < k:
        raise DatasetError(f"--cv {k}: {table.name} has {len(patients)} patient(s) ({len(table)} images); "
                           f"{k}-fold cross-validation by patient needs at least {k} patients (use fewer folds or "
                           "more patients)")
    order = np.random.default_rng([int(seed), 31337]).permutation(len(patients))
    order = order[np.argsort(-counts[order], kind="stable")]
    sizes, fold_of = np.zeros(k, dtype=int), np.empty(len(patients), dtype=int)
    for p in order:
        f = int(np.argmin(sizes))
        fold_of[p] = f
        sizes[f] += counts[p]
    return fold_of[inverse.ravel()]


def cv_splits(table: ImageTable, k: int, seed: int = 0, fractions=(0.7, 0.1, 0.2),
              label_frac: float = 1.0) -> list[Split]:
    """K patient-disjoint splits: test = fold f; validation = val/(train+val) of the other patients (by patient);
    training = the rest (optionally a nested label fraction of it)."""
    folds = patient_folds(table, k, seed)
    val_share = float(fractions[1]) / max(float(fractions[0]) + float(fractions[1]), 1e-9)
    splits = []
    for f in range(k):
        test, rest = np.flatnonzero(folds == f), np.flatnonzero(folds != f)
        if val_share > 0 and len(np.unique(table.patient_ids[rest])) > 1:
            inner = patient_split(table.subset(rest, f"the training part of fold {f}"), (1 - val_share, val_share,
                                                                                         0.0), seed + f)
            train, val = rest[inner.train], rest[inner.val]
        else:
            train, val = rest, rest[:0]
        if label_frac < 1:
            train = label_fraction(table, train, label_frac, seed)
        splits.append(Split(train, val, test, info={"kind": "cv", "fold": f, "folds": k, "seed": seed,
                                                    "val_share": val_share, "label_fraction": label_frac}))
    return splits


def parse_folds(text: str, k: int) -> list[int]:
    """``--folds 3,4`` of ``--cv K``: sorted distinct fold numbers, each in 0..K-1."""
    try:
        folds = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise DatasetError(f"--folds {text!r}: expected comma-separated fold numbers 0..{k - 1}, e.g. "
                           "--folds 3,4") from None
    bad = [f for f in folds if not 0 <= f < k]
    if not folds or bad:
        raise DatasetError(f"--folds {text!r}: fold numbers must be in 0..{k - 1} for --cv {k}"
                           + (f" (got {bad[0]})" if bad else " (none given)"))
    return folds


def finished_folds(out: str | Path, k: int | None = None) -> list[int]:
    """Folds of a CV run folder whose run finished (``fold-<f>/metrics.json``; of ``0..k-1`` when ``k`` is given)."""
    done = sorted(int(m.parent.name.split("-")[1]) for m in Path(out).glob("fold-*/metrics.json")
                  if m.parent.name.split("-")[1].isdigit())
    return [f for f in done if k is None or f < k]


def fold_list(folds: list[int]) -> str:
    return ",".join(map(str, folds))


def check_fold_splits(out: Path, finished: list[int], splits: list[Split], table: ImageTable, k: int) -> None:
    """Finished folds are reused only if they were trained on the same split: the same K and the same test part."""
    rel = table.relative_paths()
    for f in finished:
        saved = out / f"fold-{f}" / "split.json"
        doc = json.loads(saved.read_text()) if saved.is_file() else {}
        was = doc.get("info", {}).get("folds")
        if f >= k or was != k or sorted(doc.get("test", [])) != sorted(rel[i] for i in splits[f].test):
            raise DatasetError(f"--resume --cv {k}: {out / f'fold-{f}'} was trained as fold {f} of "
                               f"{was if was is not None else 'an unknown number of'} folds on other test "
                               f"{'patients' if was == k else 'folds'}: resume with the run's own --cv "
                               f"{was if was is not None else 'K'} (and data), or choose another --out")


def run_cv(cfg: RunConfig, k: int, out: str | Path, *, resume: bool = False, overwrite: bool = False,
           progress: bool = True, backbones=None, folds: list[int] | None = None) -> dict:
    """Train and evaluate ``cfg`` (its method and companions) on each of ``k`` patient folds in
    ``out/fold-<f>/`` (finished folds are reused with ``resume``), then write the cross-validated results
    (intervals from ``cfg.eval.n_boot`` resamples). ``folds`` trains only those folds (the same splits; e.g. one
    fold per machine or session): the cross-validated results are written once all ``k`` are finished, else the
    returned dict has ``partial: True`` and each finished fold's test macro AUROC per method."""
    from .run import check_resume_config, prepare_data, prepare_out, train_run
    from .trainer import CHECKPOINT

    out = Path(out)
    if resume:  # the remaining folds must train as the finished ones did
        check_resume_config(cfg, out)
    t0 = time.perf_counter()
    table, _ = prepare_data(replace(cfg.data, split_file=None))
    splits = cv_splits(table, k, cfg.data.split_seed, tuple(cfg.data.fractions), cfg.data.label_fraction)
    finished = finished_folds(out) if out.is_dir() else []
    if folds is not None and finished and not resume:
        kept = [f for f in finished if f not in folds]
        if overwrite and kept:
            raise FileExistsError(f"--overwrite with --folds would delete the finished folds {fold_list(kept)} of "
                                  f"{out}: to train fold(s) {fold_list(folds)} again, delete their fold-<f>/ folders "
                                  f"and use --resume --folds {fold_list(folds)}")
        if not overwrite:
            raise FileExistsError(f"{out} holds finished folds {fold_list(finished)} of a cross-validation: add "
                                  f"--resume to train fold(s) {fold_list(folds)} beside them")
    if resume:
        check_fold_splits(out, finished, splits, table, k)
    prepare_out(out, resume, overwrite)
    save_config(cfg, out / "config.yaml")
    for f, split in enumerate(splits):
        fold_dir = out / f"fold-{f}"
        if (resume and (fold_dir / "metrics.json").is_file()) or (folds is not None and f not in folds):
            continue
        split_file = save_split(split, table, out / "splits" / f"fold-{f}.json")
        d = cfg.to_dict()
        d["data"]["split_file"] = str(split_file.resolve())
        unit = "cases" if isinstance(table, CaseTable) else "images"
        log.info("fold %d/%d: %d train, %d val, %d test %s", f + 1, k, len(split.train), len(split.val),
                 len(split.test), unit)
        if progress:
            print(f"fold {f} ({f + 1} of {k}): {len(split.train)} train / {len(split.val)} val / "
                  f"{len(split.test)} test {unit}", flush=True)
        # an interrupted fold (a checkpoint saved) continues from it; any other unfinished fold starts afresh
        partial = resume and fold_dir.is_dir() and any(fold_dir.rglob(CHECKPOINT))
        train_run(config_from_dict(d), fold_dir, resume=partial, overwrite=not partial, progress=progress,
                  backbones=backbones)
    done = finished_folds(out, k)
    if len(done) < k:
        return {"partial": True, "folds": k, "finished": done, "missing": [f for f in range(k) if f not in done],
                "fold_macro_auroc": {f: {m: r["macro"]["auroc"] for m, r in
                                         json.loads((out / f"fold-{f}" / "metrics.json").read_text())
                                         ["methods"].items()} for f in done}}
    summary = summarise_cv(out, table, k, n_boot=cfg.eval.n_boot, seed=cfg.data.split_seed)
    summary["timings"]["total_s"] = time.perf_counter() - t0
    write_json(out / "metrics.json", summary)
    return summary


def load_fold_predictions(run_dir: Path, table: ImageTable, method: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Rows of ``table`` and scores (n, C) a fold run wrote for ``method``, and its validation thresholds."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    preds = pd.read_csv(run_dir / f"predictions_{method}.csv")
    where = {p: i for i, p in enumerate(table.relative_paths())}
    missing = [p for p in preds["image"] if p not in where]
    if missing:
        raise DatasetError(f"{run_dir}: {len(missing)} predicted image(s) are not in {table.name}, e.g. {missing[0]}")
    rows = np.array([where[p] for p in preds["image"]], dtype=int)
    scores = preds[[f"p_{lab}" for lab in table.labels]].to_numpy(dtype=np.float64)
    thresholds = metrics["methods"][method].get("thresholds")
    return rows, scores, thresholds


def summarise_cv(out: Path, table: ImageTable, k: int, n_boot: int = DEFAULT_N_BOOT, seed: int = 0) -> dict:
    """Out-of-fold predictions, per-fold and mean-over-folds metrics with fold-stratified patient-bootstrap
    intervals, pooled (labelled) metrics, paired differences to the first method, calibration before/after and
    subgroups; writes every output."""
    from . import model_card as card
    from .subgroups import group_columns, subgroup_results

    labels = list(table.labels)
    fold_metrics = [json.loads((out / f"fold-{f}" / "metrics.json").read_text()) for f in range(k)]
    methods = list(fold_metrics[0]["methods"])

    folds, oof = [], {m: np.full((len(table), len(labels)), np.nan) for m in methods}
    raw_folds: dict[str, list] = {}  # scores before calibration, per method and fold (calibrated runs only)
    groups_all = group_columns(table.meta)
    fold_of = np.full(len(table), -1)
    for f in range(k):
        entry = {"scores": {}, "thresholds": {}}
        rows0 = None
        for m in methods:
            rows, scores, thr = load_fold_predictions(out / f"fold-{f}", table, m)
            if rows0 is None:
                rows0 = rows
                if (fold_of[rows] >= 0).any():
                    raise DatasetError(f"fold {f}: {int((fold_of[rows] >= 0).sum())} image(s) were already tested in "
                                       "another fold (folds must be patient-disjoint)")
                fold_of[rows] = f
            elif not np.array_equal(rows, rows0):
                raise DatasetError(f"fold {f}: {m} was scored on other images than {methods[0]}")
            oof[m][rows] = scores
            entry["scores"][m], entry["thresholds"][m] = scores, thr
            raw = raw_fold_scores(out / f"fold-{f}", m, labels)
            if raw is not None:
                raw_folds.setdefault(m, []).append(raw)
        entry["targets"], entry["patients"] = table.targets[rows0], table.patient_ids[rows0]
        entry["groups"] = {a: v[rows0] for a, v in groups_all.items()}
        folds.append(entry)
    scored = np.flatnonzero(fold_of >= 0)
    rel = table.relative_paths()
    for m in methods:
        frame = pd.DataFrame({"image": [rel[i] for i in scored], "fold": fold_of[scored]})
        for j, lab in enumerate(labels):
            frame[f"p_{lab}"] = oof[m][scored, j]
        atomic_write_bytes(out / f"predictions_oof_{m}.csv", frame.to_csv(index=False, float_format="%.9g").encode())
    cv = cv_bootstrap(folds, labels, n_boot, BOOT_SEED, methods)
    targets, patients = table.targets[scored], table.patient_ids[scored]
    results, pooled_paired = {}, {}
    for m in methods:
        r = cv["methods"][m]
        pooled = evaluate_scores(oof[m][scored], targets, labels)
        if n_boot:
            pooled["ci"] = bootstrap_metrics(oof[m][scored], targets, labels, patients, None, n_boot, BOOT_SEED)
        results[m] = {**r, "classes": len(r["per_class"]), "pooled": pooled}
        if len(raw_folds.get(m, [])) == k:  # before calibration: the same fold-stratified draws
            raw_cv = cv_bootstrap([{**f, "scores": {m: raw_folds[m][i]}, "thresholds": {m: None}}
                                   for i, f in enumerate(folds)], labels, n_boot, BOOT_SEED, [m])["methods"][m]
            results[m]["uncalibrated"] = {
                "macro": {key: raw_cv["macro"][key] for key in card.CAL_KEYS},
                **({"ci": {"macro": {key: raw_cv["ci"]["macro"][key] for key in card.CAL_KEYS}}} if n_boot else {})}
    for m in methods[1:]:
        pair = paired_bootstrap(oof[methods[0]][scored], oof[m][scored], targets, labels, patients, n_boot,
                                BOOT_SEED)
        pair["delong"] = delong_per_class(oof[methods[0]][scored], oof[m][scored], targets, labels)
        pooled_paired[f"{methods[0]} - {m}"] = pair
    fold_rows = []
    for f, fm in enumerate(fold_metrics):
        for m in methods:
            fold_rows.append({"fold": f, "method": m, "test_images": fm["split"]["test"],
                              "test_patients": int(len(set(folds[f]["patients"]))),
                              **{key: cv["methods"][m]["fold_macro"][f].get(key) for key in
                                 ("auroc", "f1", "acc", "f1_oracle", "acc_oracle")}})
    atomic_write_bytes(out / "folds.csv", pd.DataFrame(fold_rows).to_csv(index=False).encode())
    summary = {"protocol": "cv", "folds": k, "dataset": table.name, "n_images": len(table),
               "unit": "case" if isinstance(table, CaseTable) else "image",
               "n_patients": int(len(np.unique(table.patient_ids))), "scored_images": int(len(scored)),
               "unscored_images": int(len(table) - len(scored)), "labels": labels, "methods": results,
               "paired": cv["paired"], "pooled_paired": pooled_paired,
               "trainable_parameters": fold_metrics[0].get("trainable_parameters", {}),
               "timings": {"train_s": float(sum(fm["timings"].get("train_s", 0) for fm in fold_metrics)),
                           "cache_s": float(sum(fm["timings"].get("cache_s", 0) for fm in fold_metrics))},
               "bootstrap": {"n_boot": n_boot, "seed": BOOT_SEED, "unit": "patient, stratified by fold"},
               "split_seed": seed, "class_counts": class_counts(folds, labels),
               "subgroups": subgroup_results(folds, labels, methods, n_boot, BOOT_SEED)}
    from .challenge import challenge_scores

    challenge = challenge_scores(table.notes.get("challenge"), {m: oof[m][scored] for m in methods}, targets,
                                 patients, n_boot, BOOT_SEED)
    if challenge:
        summary["challenge"] = {**challenge, "note": "pooled out-of-fold scores"}
    write_json(out / "metrics.json", summary)
    _write_per_class(out / "per_class.csv", results, summary["class_counts"])
    small = {lab for lab, (pos, neg) in summary["class_counts"].items() if too_small(pos, neg)}

    def shown(key: str) -> dict:
        return {m: {**{lab: v[key] for lab, v in r["per_class"].items()}, "macro": r["macro"][key]}
                for m, r in results.items()}

    plot_roc(out / "roc_curves.png", {m: (oof[m][scored], targets, labels) for m in methods}, labels,
             patients if n_boot else None, n_boot=min(n_boot, 200), seed=BOOT_SEED,
             note="pooled out-of-fold scores", legend_auroc=shown("auroc"), small=small)
    plot_reliability(out / "reliability.png", {m: (oof[m][scored], targets) for m in methods}, labels,
                     shown("ece"), note="pooled out-of-fold scores; legend: mean over folds", small=small)
    cfg = config_from_dict(yaml.safe_load((out / "config.yaml").read_text()) or {}) \
        if (out / "config.yaml").is_file() else None
    atomic_write_bytes(out / "report.md", (cv_report(summary, table, cfg) + "\n").encode())
    return summary


def raw_fold_scores(run_dir: Path, method: str, labels) -> np.ndarray | None:
    """A calibrated fold run's scores before calibration (``u_<label>`` columns), or None."""
    preds = pd.read_csv(run_dir / f"predictions_{method}.csv")
    cols = [f"u_{lab}" for lab in labels]
    return preds[cols].to_numpy(dtype=np.float64) if all(c in preds for c in cols) else None


def class_counts(folds: list[dict], labels) -> dict[str, list[int]]:
    """Per class the fewest positives and the fewest negatives in any fold's test part (the "n too small" rule)."""
    out = {}
    for j, lab in enumerate(labels):
        pos = [int((f["targets"][:, j] == 1).sum()) for f in folds]
        neg = [int((f["targets"][:, j] == 0).sum()) for f in folds]
        out[lab] = [min(pos), min(neg)]
    return out


def _write_per_class(path: Path, results: dict, counts: dict | None = None) -> None:
    rows = []
    for m, r in results.items():
        ci = r.get("ci", {}).get("per_class", {})
        for lab, v in r["per_class"].items():
            pos, neg = (counts or {}).get(lab, (MIN_CASES, MIN_CASES))
            small = too_small(pos, neg)  # fewest positives / negatives in a fold's test part: no interval
            row = {"method": m, "label": lab, "min_fold_positives": pos, "min_fold_negatives": neg,
                   "n_too_small": small}
            for key, val in v.items():
                row[key] = val
                lo, hi = (None, None) if small else ci.get(lab, {}).get(key, (None, None))
                row[f"{key}_lo"], row[f"{key}_hi"] = lo, hi
            pooled = r["pooled"]["per_class"].get(lab, {})
            row["pooled_auroc"] = pooled.get("auroc")
            rows.append(row)
    atomic_write_bytes(path, pd.DataFrame(rows).to_csv(index=False).encode())


def cv_headline(summary: dict) -> list[str]:
    """The lines a user reads first: mean-over-folds macro AUROC of each method with its interval, each paired
    difference with interval, p-value and verdict, and what the interval means."""
    k, boot = summary["folds"], summary["bootstrap"]
    lines = [f"{k}-fold patient cross-validation on {summary['dataset']}: {summary['scored_images']} "
             f"{'cases' if summary.get('unit') == 'case' else 'images'} of "
             f"{summary['n_patients']} patients, each tested exactly once (by a model that never saw its patient).",
             "", "Mean over folds of the macro AUROC (%), 95% interval:"]
    for m, r in summary["methods"].items():
        folds = ", ".join(f"{100 * fm['auroc']:.1f}" for fm in r["fold_macro"])
        lines.append(f"  {m:14s} {fmt_ci(r['macro']['auroc'], r.get('ci', {}).get('macro', {}).get('auroc'))}"
                     f"   (folds: {folds})")
    lines += ["", "Calibration, mean over folds (%; lower is better), 95% interval:"]
    for m, r in summary["methods"].items():
        ci = r.get("ci", {}).get("macro", {})
        now = f"Brier {fmt_ci(r['macro']['brier'], ci.get('brier'))}, ECE {fmt_ci(r['macro']['ece'], ci.get('ece'))}"
        u = r.get("uncalibrated")
        if u:
            uci = u.get("ci", {}).get("macro", {})
            now = (f"before calibration Brier {fmt_ci(u['macro']['brier'], uci.get('brier'))}, ECE "
                   f"{fmt_ci(u['macro']['ece'], uci.get('ece'))}; after: {now}")
        lines.append(f"  {m:14s} {now}")
    for name, pair in summary["paired"].items():
        a, b = name.split(" - ", 1)
        ahead = sum(d > 0 for d in pair["fold_diffs"])
        lines += ["", f"Paired difference {name}: {fmt_diff(pair)}  -> {verdict(pair, a, b)}; "
                      f"{a} ahead in {ahead} of {k} folds."]
    if boot["n_boot"]:
        lines += ["", f"What the interval means: redrawing the patients of each fold with replacement "
                      f"({boot['n_boot']} times, seed {boot['seed']}) and recomputing, 95% of the results fall in "
                      "the interval; if the interval of a difference contains 0, the two methods are tied on this "
                      "data."]
    return lines


def cv_report(summary: dict, table: ImageTable, cfg: RunConfig | None = None) -> str:
    from . import model_card as card
    from .subgroups import subgroup_markdown

    methods = summary["methods"]
    title = f"medbridge {summary['folds']}-fold patient cross-validation on {summary['dataset']}"
    if cfg is not None:
        split_text = (f"{summary['folds']}-fold patient cross-validation: every image is tested once, by a model "
                      f"trained without its patient; each fold's validation part ({cfg.data.fractions[1]:g} of the "
                      "other patients) picks thresholds and fits the calibrator.")
        lines = card.card_head(title, cfg, table, split_text, summary.get("trainable_parameters", {}))
        lines += ["## Metrics", ""]
    else:
        lines = [f"# {title}", ""]
    lines += cv_headline(summary)
    lines += ["", "## Mean over folds (primary result)", "",
              "Each fold's metrics on its test part (F1/ACC at thresholds picked on that fold's validation part, and "
              "at the oracle threshold), averaged over folds; 95% interval from a patient bootstrap stratified by "
              "fold.", "", summary_table(methods), ""]
    if summary["paired"]:
        lines += [paired_table(summary["paired"]), ""]
    lines += ["## Per fold", "", "| fold | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for f in range(summary["folds"]):
        lines.append(f"| {f} | " + " | ".join(f"{100 * r['fold_macro'][f]['auroc']:.2f}" for r in methods.values())
                     + " |")
    skipped = {m: r["skipped"] for m, r in methods.items() if r["skipped"]}
    if skipped:
        first = next(iter(skipped.values()))
        lines += ["", "Classes without positives or negatives in a fold's test part (left out of that fold's macro; "
                      f"their mean over folds uses the other folds): {first}."]
    lines += ["", "## Per class (mean over folds, 95% interval)", "",
              "| label | " + " | ".join(methods) + " | difference " + " / ".join(summary["paired"]) + " |",
              "|---" * (len(methods) + 2) + "|"]
    first_pair = next(iter(summary["paired"].values()), {})
    counts = summary.get("class_counts", {})
    for lab in next(iter(methods.values()))["per_class"]:
        pos, neg = counts.get(lab, (None, None))
        cells = [fmt_class(r["per_class"].get(lab, {}).get("auroc", float("nan")),
                           r.get("ci", {}).get("per_class", {}).get(lab, {}).get("auroc"), pos, neg)
                 for r in methods.values()]
        pc = first_pair.get("per_class", {}).get(lab)
        small = pos is not None and too_small(pos, neg)
        cells.append("n too small" if pc and small else fmt_diff(pc) if pc else "-")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    lines += ["", "## Pooled out-of-fold scores (secondary)", "",
              "All images' out-of-fold scores in one ROC per class. The K models' score scales differ, so pooling "
              "mixes calibrations and is not the primary result; shown for the ROC plot and per-image inspection.",
              "", "| method | pooled macro AUROC [95% CI] |", "|---|---|"]
    for m, r in methods.items():
        p = r["pooled"]
        lines.append(f"| {m} | {fmt_ci(p['macro']['auroc'], p.get('ci', {}).get('macro', {}).get('auroc'))} |")
    if summary.get("challenge"):
        from .challenge import challenge_lines

        lines += ["", *challenge_lines({m: r for m, r in summary["challenge"].items() if m != "note"})]
    for name, pair in summary["pooled_paired"].items():
        lines += ["", f"Pooled paired difference {name}: {fmt_diff(pair)}.", "",
                  "Per class, pooled, DeLong's test for correlated ROC curves:", "",
                  "| label | AUROC a | AUROC b | z | p |", "|---|---|---|---|---|"]
        for lab, dl in pair["delong"].items():
            lines.append(f"| {lab} | {100 * dl['auc_a']:.1f} | {100 * dl['auc_b']:.1f} | {dl['z']:+.2f} | "
                         f"{fmt_p(dl['p'])} |")
    boot = summary["bootstrap"]
    lines += ["", ci_sentence(boot["n_boot"], boot["seed"], "patients of each fold") if boot["n_boot"] else "",
              "", "![ROC curves of the pooled out-of-fold scores with 95% patient-bootstrap bands](roc_curves.png)",
              "", "Files: metrics.json, per_class.csv, folds.csv, predictions_oof_<method>.csv (fold of each image; "
              "pooled scores), roc_curves.png, config.yaml, splits/fold-<f>.json, fold-<f>/ (a full run folder per "
              "fold: adapter, probe, metrics, predictions).",
              f"Unscored (unreadable) images: {summary['unscored_images']}." if summary["unscored_images"] else ""]
    if counts:
        lines += ["", f"\"n too small\": fewer than {MIN_CASES} positives or negatives in some fold's test part; the "
                      "fold mean is shown without an interval."]
    if cfg is not None:
        n_test = summary["n_patients"]
        lines += ["", *card.card_calibration(methods, cfg.eval.calibrate),
                  *card.card_subgroups(subgroup_markdown(summary.get("subgroups", {}), list(methods))),
                  *card.card_limitations(methods, table, summary.get("subgroups", {}), n_test,
                                         {lab: tuple(c) for lab, c in counts.items()},
                                         calibrated=cfg.eval.calibrate != "none"), *card.card_command()]
    return "\n".join(lines)


__all__ = ["patient_folds", "cv_splits", "run_cv", "summarise_cv", "cv_headline", "load_fold_predictions"]
