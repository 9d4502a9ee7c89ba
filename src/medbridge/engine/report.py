"""Run outputs: metrics JSON, per-class CSV, predictions CSV, ROC curves PNG, Markdown report."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ..io import atomic_write_bytes
from .metrics import roc_curve


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, default=float).encode())


def save_figure(fig, path: Path, dpi: int = 100, svg: bool = False) -> None:
    """Tight layout, PNG (and with ``svg`` an SVG beside it), written atomically. Figures are
    ``matplotlib.figure.Figure`` objects (no pyplot: the caller's backend is never switched)."""
    import io

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    if svg:
        vec = io.BytesIO()
        fig.savefig(vec, format="svg")
        atomic_write_bytes(Path(path).with_suffix(".svg"), vec.getvalue())
    atomic_write_bytes(path, buf.getvalue())


PRINT_DPI = 300  # run figures: PNG at print resolution, plus SVG


def readable(label: str) -> str:
    """A label name as a reader writes it: ``Pleural_Thickening`` -> ``Pleural thickening``."""
    words = str(label).split("_")
    return " ".join([words[0], *(w.lower() for w in words[1:])])


def per_class_table(results: dict[str, dict]) -> pd.DataFrame:
    """{method: evaluate_scores(...)} -> one row per (method, class)."""
    from .stats import too_small

    rows = []
    for method, res in results.items():
        ci = (res.get("ci") or {}).get("per_class", {})
        for lab, r in res["per_class"].items():
            row = {"method": method, "label": lab, **{k: r.get(k) for k in
                   ("auroc", "f1", "acc", "f1_oracle", "acc_oracle", "brier", "ece", "n", "positives", "negatives")}}
            small = too_small(r.get("positives", 0), r.get("negatives", r.get("n", 0) - r.get("positives", 0)))
            row["n_too_small"] = small  # fewer than MIN_CASES positives or negatives: no interval
            for k in ("auroc", "f1", "acc", "f1_oracle", "acc_oracle", "brier", "ece"):
                lo, hi = (None, None) if small else ci.get(lab, {}).get(k, (None, None))
                row[f"{k}_lo"], row[f"{k}_hi"] = lo, hi
            rows.append(row)
    return pd.DataFrame(rows)


def write_predictions(path: Path, relative_paths: list[str], labels, scores: np.ndarray, thresholds: dict,
                      extra: dict | None = None) -> None:
    frame = pd.DataFrame({"image": relative_paths})
    for j, lab in enumerate(labels):
        frame[f"p_{lab}"] = scores[:, j].astype(np.float64)  # written with 9 significant digits: no new ties
    for j, lab in enumerate(labels):
        t = thresholds.get(lab, 0.5)
        frame[f"y_{lab}"] = (scores[:, j] >= t).astype(int) if np.isfinite(t) else 0
    for k, v in (extra or {}).items():
        frame[k] = v
    atomic_write_bytes(path, frame.to_csv(index=False, float_format="%.9g").encode())


def roc_band(scores: np.ndarray, labels: np.ndarray, image_counts: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """True positive rate at the false positive rates ``grid`` of every bootstrap resample (B, len(grid))."""
    order = np.argsort(-scores, kind="mergesort")
    s, y, w = scores[order], labels[order].astype(bool), image_counts[:, order].astype(np.float64)
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]
    tp = np.cumsum(np.add.reduceat(w * y, starts, axis=1), axis=1)
    fp = np.cumsum(np.add.reduceat(w * ~y, starts, axis=1), axis=1)
    out = np.full((len(w), len(grid)), np.nan)
    for b in range(len(w)):
        if tp[b, -1] > 0 and fp[b, -1] > 0:
            out[b] = np.interp(grid, np.r_[0, fp[b] / fp[b, -1]], np.r_[0, tp[b] / tp[b, -1]])
    return out


def _class_counts(targets: np.ndarray, j: int) -> tuple[int, int]:
    known = ~np.isnan(targets[:, j])
    return int((targets[known, j] == 1).sum()), int((targets[known, j] == 0).sum())


def _panels(n_panels: int):
    """A figure of 4-wide panels for ``n_panels`` plots, every axis hidden until :func:`_frame` draws it."""
    from matplotlib.figure import Figure

    cols = 4
    n_rows = max(1, int(np.ceil(n_panels / cols)))
    fig = Figure(figsize=(3.2 * cols, 3.1 * n_rows))
    axes = fig.subplots(n_rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes


def _frame(ax, title: str, xlabel: str, ylabel: str, legend_loc: str, legend_title: str) -> None:
    """Unit square with the diagonal, labels and the legend of one panel."""
    ax.axis("on")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=7)
    ax.set_ylabel(ylabel, fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc=legend_loc, title=legend_title, title_fontsize=7)


def plot_roc(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], labels,
             patient_ids=None, n_boot: int = 200, seed: int = 0, note: str = "",
             legend_auroc: dict[str, dict] | None = None, small: set[str] | None = None) -> None:
    """One panel per class plus a macro panel (TPR averaged over classes at each FPR), one line per method;
    ``curves[method] = (scores, targets, label list)``. With ``patient_ids``, each curve gets its 95%
    patient-bootstrap band (pointwise percentiles of the resampled curves' TPR at each FPR), except classes with
    fewer than ``MIN_CASES`` positives or negatives ("n too small"). ``legend_auroc[method]`` = {label: AUROC,
    "macro": AUROC} puts the headline table's values in the legends (default: the AUROC of these scores);
    ``small``: the labels that are "n too small" in the report (default: judged on these targets)."""
    from .metrics import auroc
    from .stats import MIN_CASES, image_counts_for, too_small

    present = [j for j, _ in enumerate(labels)
               if any((~np.isnan(t[:, j])).any() and len(np.unique(t[~np.isnan(t[:, j]), j])) == 2
                      for _, t, _ in curves.values())]
    counts = image_counts_for(patient_ids, n_boot, seed) if patient_ids is not None and n_boot > 0 else None
    small_set = small
    grid = np.linspace(0, 1, 101)
    fig, axes = _panels(len(present) + 1)
    macro_ax = axes.flat[0]
    macro = {}

    def shown(method: str, key: str, fallback: float) -> float:
        value = (legend_auroc or {}).get(method, {}).get(key)
        return fallback if value is None else value

    def frame(ax, title: str) -> None:
        _frame(ax, title, "1 − specificity (false positive rate)", "sensitivity (true positive rate)",
               "lower right", "AUROC")

    for ax, j in zip(list(axes.flat)[1:], present):
        small = False
        for k, (method, (scores, targets, _)) in enumerate(curves.items()):
            known = ~np.isnan(targets[:, j])
            s, y = scores[known, j], targets[known, j]
            if len(np.unique(y)) < 2:
                continue
            color = f"C{k}"
            fpr, tpr = roc_curve(s, y)
            ax.plot(fpr, tpr, color=color, label=f"{method} {100 * shown(method, labels[j], auroc(s, y)):.1f}")
            small = too_small(*_class_counts(targets, j)) if small_set is None else labels[j] in small_set
            band = roc_band(s, y, counts[:, known], grid) if counts is not None else None
            if band is not None and not small:
                lo, hi = np.nanpercentile(band, [2.5, 97.5], axis=0)
                ax.fill_between(grid, lo, hi, color=color, alpha=0.2, lw=0)
            macro.setdefault(method, []).append((np.interp(grid, fpr, tpr), band))
        pos, neg = _class_counts(next(iter(curves.values()))[1], j)
        frame(ax, f"{readable(labels[j])} ({pos} positive, {neg} negative)"
                  + (f"\nn too small (< {MIN_CASES}{' in a test part' if small_set is not None else ''}): no band"
                     if small and counts is not None else ""))
    for k, (method, parts) in enumerate(macro.items()):
        mean_tpr = np.mean([c for c, _ in parts], axis=0)
        value = (legend_auroc or {}).get(method, {}).get("macro")
        macro_ax.plot(grid, mean_tpr, color=f"C{k}", label=method + (f" {100 * value:.1f}" if value is not None
                                                                      else ""))
        if counts is not None:
            with warnings.catch_warnings():  # resamples where no class could be drawn are all-NaN: left out
                warnings.simplefilter("ignore", RuntimeWarning)
                bands = np.nanmean(np.stack([b for _, b in parts]), axis=0)
                lo, hi = np.nanpercentile(bands, [2.5, 97.5], axis=0)
            macro_ax.fill_between(grid, lo, hi, color=f"C{k}", alpha=0.2, lw=0)
    frame(macro_ax, "macro (mean sensitivity over classes)" + (f"\n{note}" if note else ""))
    title = "ROC curves" + (f" of {note}" if note else "")
    if legend_auroc:
        title += "; legend: the report's AUROC (%)"
    if counts is not None:
        title += f"; shaded: 95% patient-bootstrap band ({n_boot} resamples, seed {seed})"
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path, dpi=PRINT_DPI, svg=True)


def plot_reliability(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], labels,
                     ece_shown: dict[str, dict] | None = None, note: str = "", small: set[str] | None = None) -> None:
    """Reliability diagram: per class (and all classes together) the observed positive rate against the mean
    predicted probability in 10 equal-width bins, one line per method, point area ~ images in the bin.
    ``curves[method] = (scores, targets)``; ``ece_shown[method]`` = {label: ECE, "macro": ECE} for the legends."""
    from .calibration import ece, reliability_curve
    from .stats import MIN_CASES, too_small

    present = [j for j, _ in enumerate(labels) if any(len(np.unique(t[~np.isnan(t[:, j]), j])) == 2
                                                       for _, t in curves.values())]
    small_set = small
    fig, axes = _panels(len(present) + 1)

    def draw(ax, s, y, k, name, value):
        c = reliability_curve(s, y)
        ax.plot(c["mean_probability"], c["positive_rate"], color=f"C{k}", lw=1, label=f"{name} {100 * value:.1f}")
        ax.scatter(c["mean_probability"], c["positive_rate"], s=4 + 60 * np.sqrt(np.array(c["count"]) / len(s)),
                   color=f"C{k}", alpha=0.7)

    def frame(ax, title: str) -> None:
        _frame(ax, title, "predicted probability", "observed frequency of the label", "upper left", "ECE (%)")

    for k, (method, (scores, targets)) in enumerate(curves.items()):
        known = ~np.isnan(targets)
        value = (ece_shown or {}).get(method, {}).get("macro")
        draw(axes.flat[0], scores[known], targets[known], k, method,
             ece(scores[known], targets[known]) if value is None else value)
    frame(axes.flat[0], "all classes together" + (" (legend: macro ECE)" if ece_shown else "")
          + (f"\n{note}" if note else ""))
    for ax, j in zip(list(axes.flat)[1:], present):
        small = False
        for k, (method, (scores, targets)) in enumerate(curves.items()):
            known = ~np.isnan(targets[:, j])
            s, y = scores[known, j], targets[known, j]
            small = too_small(*_class_counts(targets, j)) if small_set is None else labels[j] in small_set
            value = (ece_shown or {}).get(method, {}).get(labels[j])
            draw(ax, s, y, k, method, ece(s, y) if value is None else value)
        pos, neg = _class_counts(next(iter(curves.values()))[1], j)
        frame(ax, f"{readable(labels[j])} ({pos} positive, {neg} negative)"
                  + (f"\nn too small (< {MIN_CASES}{' in a test part' if small_set is not None else ''})"
                     if small else ""))
    fig.suptitle("Reliability diagram: a calibrated model lies on the diagonal (10 equal-width bins; point area "
                 "~ images in the bin)", fontsize=9)
    save_figure(fig, path, dpi=PRINT_DPI, svg=True)


def summary_table(results: dict[str, dict], extra: dict[str, dict] | None = None) -> str:
    """Markdown table: method, macro AUROC, F1/ACC at validation thresholds and at oracle thresholds, each with
    its 95% patient-bootstrap interval when the results carry one (``78.4 [72.1, 84.0]``)."""
    from .stats import fmt_ci

    more_keys = list(next(iter(extra.values()))) if extra else []
    lines = ["| method | macro AUROC | F1 (val thr.) | ACC (val thr.) | F1 (oracle thr.) | ACC (oracle thr.) |"
             + "".join(f" {k} |" for k in more_keys), "|---|---|---|---|---|---|" + "---|" * len(more_keys)]
    for method, res in results.items():
        m, ci = res["macro"], (res.get("ci") or {}).get("macro", {})
        cells = [fmt_ci(m.get(k, float("nan")), ci.get(k)) for k in ("auroc", "f1", "acc", "f1_oracle",
                                                                      "acc_oracle")]
        more = [str(v) for v in extra[method].values()] if extra else []
        lines.append(f"| {method} | " + " | ".join(cells + more) + " |")
    return "\n".join(lines)


def paired_table(paired: dict[str, dict]) -> str:
    """Markdown: each paired difference of macro AUROC with its interval, p-value and a plain verdict."""
    from .stats import fmt_diff, verdict

    lines = ["| comparison | macro AUROC difference [95% CI], p | reading |", "|---|---|---|"]
    for name, pair in paired.items():
        a, b = name.split(" - ", 1)
        lines.append(f"| {name} | {fmt_diff(pair)} | {verdict(pair, a, b)} |")
    return "\n".join(lines)


def ci_sentence(n_boot: int, seed, unit: str = "patients") -> str:
    """One plain sentence on what the intervals mean."""
    return (f"Intervals are 95% bootstrap intervals: the {unit} were redrawn with replacement {n_boot} times "
            f"(seed {seed}) and each metric recomputed; a difference whose interval contains 0 is a tie, not a "
            "win.")


def collect_runs(folders: list[Path]) -> pd.DataFrame:
    """One row per (run, method) from the runs' ``metrics.json`` (single runs and ``--cv`` runs, whose macro is
    the mean over folds): the input of paper-style tables. ``*_lo`` / ``*_hi``: the 95% interval."""
    import yaml

    rows = []
    for folder in folders:
        f = Path(folder) / "metrics.json"
        if not f.is_file():
            raise FileNotFoundError(f"{folder}: no metrics.json (not a finished run folder)")
        m = json.loads(f.read_text())
        cfg_file = Path(folder) / "config.yaml"
        cfg = yaml.safe_load(cfg_file.read_text()) if cfg_file.is_file() else {}
        for method, res in m["methods"].items():
            macro = res["macro"]
            ci = (res.get("ci") or {}).get("macro", {})
            row = {"run": str(folder), "dataset": m["dataset"], "method": method,
                   "protocol": f"cv{m['folds']}" if m.get("protocol") == "cv" else "split",
                   "backbones": "+".join(cfg.get("backbones") or cfg.get("model", {}).get("backbones", []) or []),
                   "label_fraction": cfg.get("data", {}).get("label_fraction", 1.0),
                   "seed": cfg.get("train", {}).get("seed"), "classes": res["classes"],
                   "ensemble": _ensemble_size(Path(folder), method),
                   "trainable_parameters": m.get("trainable_parameters", {}).get(method),
                   "train_s": m.get("timings", {}).get("train_s")}
            for k in ("auroc", "f1", "acc", "f1_oracle", "acc_oracle"):
                row[k] = macro.get(k)
                row[f"{k}_lo"], row[f"{k}_hi"] = (ci.get(k) or (None, None))
            rows.append(row)
    return pd.DataFrame(rows)


def _members(size) -> str:
    return f" (ensemble of {int(size)})" if pd.notna(size) and int(size) > 1 else ""


def _ensemble_size(folder: Path, method: str) -> int:
    """Members of ``method``'s saved model in a run folder (a CV folder: its first fold); 1 for a single model."""
    for meta in [*folder.glob("*/adapter.json"), *folder.glob("fold-0/*/adapter.json")]:
        try:
            saved = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if saved.get("method") == method:
            return int(saved.get("ensemble", 1))
    return 1


def paper_table(frame: pd.DataFrame) -> str:
    """Markdown per method, dataset, label fraction and protocol: one run -> the metric with its 95%
    patient-bootstrap interval (``78.4 [72.1, 84.0]``); several runs (seeds) -> mean ± std over them."""
    from .stats import fmt_ci

    keys = ["dataset", "label_fraction", "protocol", "method"] if "protocol" in frame else \
        ["dataset", "label_fraction", "method"]
    if "ensemble" in frame:  # an ensemble is another model than one member: never averaged with single runs
        keys.append("ensemble")
    lines = ["| dataset | labels | protocol | method | runs | AUROC | F1 (val thr.) | ACC (val thr.) | F1 (oracle) |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cell(g, col):
        v = g[col].astype(float)
        if len(v) > 1:
            return f"{100 * v.mean():.2f} ± {100 * v.std(ddof=1):.2f}"
        lo, hi = (g[f"{col}_lo"].iloc[0], g[f"{col}_hi"].iloc[0]) if f"{col}_lo" in g else (None, None)
        ci = [float(lo), float(hi)] if lo is not None and hi is not None and pd.notna(lo) and pd.notna(hi) else None
        return fmt_ci(float(v.iloc[0]), ci)

    for key, g in frame.groupby(keys, sort=False):
        key = dict(zip(keys, key))
        method = f"{key['method']}{_members(key.get('ensemble', 1))}"
        lines.append(f"| {key['dataset']} | {100 * float(key['label_fraction']):g}% | {key.get('protocol', 'split')} "
                     f"| {method} | {len(g)} | {cell(g, 'auroc')} | {cell(g, 'f1')} | {cell(g, 'acc')} | "
                     f"{cell(g, 'f1_oracle')} |")
    return "\n".join(lines)
