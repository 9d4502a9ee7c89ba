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


def save_figure(fig, path: Path, dpi: int = 100) -> None:
    """Tight layout, PNG, written atomically. Figures are ``matplotlib.figure.Figure`` objects (no pyplot: the
    caller's backend is never switched)."""
    import io

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())


def per_class_table(results: dict[str, dict]) -> pd.DataFrame:
    """{method: evaluate_scores(...)} -> one row per (method, class)."""
    rows = []
    for method, res in results.items():
        ci = (res.get("ci") or {}).get("per_class", {})
        for lab, r in res["per_class"].items():
            row = {"method": method, "label": lab, **{k: r.get(k) for k in
                   ("auroc", "f1", "acc", "f1_oracle", "acc_oracle", "n", "positives")}}
            for k in ("auroc", "f1", "acc", "f1_oracle", "acc_oracle"):
                lo, hi = ci.get(lab, {}).get(k, (None, None))
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


def plot_roc(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], labels,
             patient_ids=None, n_boot: int = 200, seed: int = 0, note: str = "") -> None:
    """One panel per class plus a macro panel (TPR averaged over classes at each FPR), one line per method;
    ``curves[method] = (scores, targets, label list)``. With ``patient_ids``, each curve gets its 95%
    patient-bootstrap band (pointwise percentiles of the resampled curves' TPR at each FPR)."""
    from matplotlib.figure import Figure

    from .metrics import auroc
    from .stats import image_counts_for

    present = [j for j, _ in enumerate(labels)
               if any((~np.isnan(t[:, j])).any() and len(np.unique(t[~np.isnan(t[:, j]), j])) == 2
                      for _, t, _ in curves.values())]
    counts = image_counts_for(patient_ids, n_boot, seed) if patient_ids is not None and n_boot > 0 else None
    grid = np.linspace(0, 1, 101)
    cols = 4
    n_rows = max(1, int(np.ceil((len(present) + 1) / cols)))
    fig = Figure(figsize=(3.2 * cols, 3.0 * n_rows))
    axes = fig.subplots(n_rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    macro_ax = axes.flat[0]
    macro = {}
    for ax, j in zip(list(axes.flat)[1:], present):
        ax.axis("on")
        for k, (method, (scores, targets, _)) in enumerate(curves.items()):
            known = ~np.isnan(targets[:, j])
            s, y = scores[known, j], targets[known, j]
            if len(np.unique(y)) < 2:
                continue
            color = f"C{k}"
            fpr, tpr = roc_curve(s, y)
            ax.plot(fpr, tpr, color=color, label=f"{method} {auroc(s, y):.2f}")
            band = roc_band(s, y, counts[:, known], grid) if counts is not None else None
            if band is not None:
                lo, hi = np.nanpercentile(band, [2.5, 97.5], axis=0)
                ax.fill_between(grid, lo, hi, color=color, alpha=0.2, lw=0)
            macro.setdefault(method, []).append((np.interp(grid, fpr, tpr), band))
        ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
        ax.set_title(f"{labels[j]} (n+={int(np.nansum(targets[:, j]))})", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax.tick_params(labelsize=7)
    macro_ax.axis("on")
    for k, (method, parts) in enumerate(macro.items()):
        mean_tpr = np.mean([c for c, _ in parts], axis=0)
        macro_ax.plot(grid, mean_tpr, color=f"C{k}", label=method)
        if counts is not None:
            with warnings.catch_warnings():  # resamples where no class could be drawn are all-NaN: left out
                warnings.simplefilter("ignore", RuntimeWarning)
                bands = np.nanmean(np.stack([b for _, b in parts]), axis=0)
                lo, hi = np.nanpercentile(bands, [2.5, 97.5], axis=0)
            macro_ax.fill_between(grid, lo, hi, color=f"C{k}", alpha=0.2, lw=0)
    macro_ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
    macro_ax.set_title("macro (mean TPR over classes)" + (f"\n{note}" if note else ""), fontsize=9)
    macro_ax.legend(fontsize=7, loc="lower right")
    macro_ax.tick_params(labelsize=7)
    if counts is not None:
        fig.suptitle(f"ROC curves{' of ' + note if note else ''}; shaded: 95% patient-bootstrap band ({n_boot} "
                     f"resamples, seed {seed})", fontsize=9)
    save_figure(fig, path, dpi=90)


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
