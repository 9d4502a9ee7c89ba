"""Run outputs: metrics JSON, per-class CSV, predictions CSV, ROC curves PNG, Markdown report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..backbones.loading import atomic_write_bytes
from .metrics import roc_curve


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, default=float).encode())


def save_figure(fig, path: Path, dpi: int = 100) -> None:
    """Tight layout, PNG, written atomically, figure closed."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def per_class_table(results: dict[str, dict]) -> pd.DataFrame:
    """{method: evaluate_scores(...)} -> one row per (method, class)."""
    rows = []
    for method, res in results.items():
        for lab, r in res["per_class"].items():
            rows.append({"method": method, "label": lab, **{k: r.get(k) for k in
                         ("auroc", "f1", "acc", "f1_oracle", "acc_oracle", "n", "positives")}})
    return pd.DataFrame(rows)


def write_predictions(path: Path, relative_paths: list[str], labels, scores: np.ndarray, thresholds: dict,
                      extra: dict | None = None) -> None:
    frame = pd.DataFrame({"image": relative_paths})
    for j, lab in enumerate(labels):
        frame[f"p_{lab}"] = np.round(scores[:, j], 6)
    for j, lab in enumerate(labels):
        t = thresholds.get(lab, 0.5)
        frame[f"y_{lab}"] = (scores[:, j] >= t).astype(int) if np.isfinite(t) else 0
    for k, v in (extra or {}).items():
        frame[k] = v
    atomic_write_bytes(path, frame.to_csv(index=False).encode())


def plot_roc(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], labels) -> None:
    """One panel per class, one line per method; ``curves[method] = (scores, targets, label list)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [j for j, _ in enumerate(labels)
               if any((~np.isnan(t[:, j])).any() and len(np.unique(t[~np.isnan(t[:, j]), j])) == 2
                      for _, t, _ in curves.values())]
    cols = 4
    n_rows = max(1, int(np.ceil(len(present) / cols)))
    fig, axes = plt.subplots(n_rows, cols, figsize=(3.2 * cols, 3.0 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, j in zip(axes.flat, present):
        ax.axis("on")
        for method, (scores, targets, _) in curves.items():
            known = ~np.isnan(targets[:, j])
            fpr, tpr = roc_curve(scores[known, j], targets[known, j])
            from .metrics import auroc

            ax.plot(fpr, tpr, label=f"{method} {auroc(scores[known, j], targets[known, j]):.2f}")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
        ax.set_title(f"{labels[j]} (n+={int(np.nansum(targets[:, j]))})", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax.tick_params(labelsize=7)
    save_figure(fig, path, dpi=90)


def summary_table(results: dict[str, dict], extra: dict[str, dict] | None = None) -> str:
    """Markdown table: method, macro AUROC, F1/ACC at validation thresholds and at oracle thresholds."""
    lines = ["| method | macro AUROC | F1 (val thr.) | ACC (val thr.) | F1 (oracle thr.) | ACC (oracle thr.) |"
             + ("".join(f" {k} |" for k in next(iter(extra.values()))) if extra else ""),
             "|---|---|---|---|---|---|" + ("---|" * len(next(iter(extra.values()))) if extra else "")]
    for method, res in results.items():
        m = res["macro"]
        cells = [f"{100 * m.get(k, float('nan')):.2f}" for k in ("auroc", "f1", "acc", "f1_oracle", "acc_oracle")]
        more = [str(v) for v in extra[method].values()] if extra else []
        lines.append(f"| {method} | " + " | ".join(cells + more) + " |")
    return "\n".join(lines)


def collect_runs(folders: list[Path]) -> pd.DataFrame:
    """One row per (run, method) from the runs' ``metrics.json``: the input of paper-style tables."""
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
            rows.append({"run": str(folder), "dataset": m["dataset"], "method": method,
                         "backbones": "+".join(cfg.get("model", {}).get("backbones", []) or []),
                         "label_fraction": cfg.get("data", {}).get("label_fraction", 1.0),
                         "seed": cfg.get("train", {}).get("seed"), "auroc": macro.get("auroc"),
                         "f1": macro.get("f1"), "acc": macro.get("acc"), "f1_oracle": macro.get("f1_oracle"),
                         "acc_oracle": macro.get("acc_oracle"), "classes": res["classes"],
                         "trainable_parameters": m.get("trainable_parameters", {}).get(method),
                         "train_s": m.get("timings", {}).get("train_s")})
    return pd.DataFrame(rows)


def paper_table(frame: pd.DataFrame) -> str:
    """Markdown: mean +- std over seeds of AUROC / F1 / ACC (%) per method, dataset and label fraction."""
    keys = ["dataset", "label_fraction", "method"]
    lines = ["| dataset | labels | method | runs | AUROC | F1 (val thr.) | ACC (val thr.) | F1 (oracle) |",
             "|---|---|---|---|---|---|---|---|"]
    def ms(g, col):
        v = 100 * g[col].astype(float)
        return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v.mean():.2f}"

    for key, g in frame.groupby(keys, sort=False):
        lines.append(f"| {key[0]} | {100 * float(key[1]):g}% | {key[2]} | {len(g)} | {ms(g, 'auroc')} | "
                     f"{ms(g, 'f1')} | {ms(g, 'acc')} | {ms(g, 'f1_oracle')} |")
    return "\n".join(lines)
