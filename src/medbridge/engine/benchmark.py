"""``medbridge benchmark``: several methods on the same data, split, seeds and backbone -> paper-style table."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..backbones.loading import atomic_write_bytes
from ..methods.baselines import NotApplicableError
from .config import RunConfig, config_from_dict
from .report import collect_runs, paper_table, save_figure
from .run import train_run

log = logging.getLogger(__name__)


def bar_chart(frame: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = frame.groupby("method", sort=False)["auroc"]
    mean, std = 100 * g.mean(), 100 * g.std(ddof=1).fillna(0)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(mean), 3.4))
    ax.bar(range(len(mean)), mean.values, yerr=std.values, capsize=4, color="#4C72B0")
    ax.set_xticks(range(len(mean)), mean.index, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("macro AUROC (%)")
    lo = max(0.0, float((mean - std).min()) - 5)
    ax.set_ylim(lo, min(100.0, float((mean + std).max()) + 3))
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def run_benchmark(base: RunConfig, methods: list[str], seeds: list[int], out: str | Path, *,
                  progress: bool = True, command: str = "") -> dict:
    """Train and evaluate every (method, seed) in ``out/<method>-s<seed>/`` (finished runs are reused, so an
    interrupted benchmark continues), then write ``results.md``, ``results.csv`` and ``results.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done, not_applicable = [], {}
    for method in methods:
        for seed in seeds:
            d = base.to_dict()
            d["method"] = method
            d["train"]["seed"] = seed
            d["data"]["split_seed"] = seed
            cfg = config_from_dict(d)
            run_dir = out / f"{method}-s{seed}"
            if (run_dir / "metrics.json").is_file():
                done.append(run_dir)
                continue
            try:
                train_run(cfg, run_dir, overwrite=True, progress=progress)
            except NotApplicableError as exc:
                not_applicable[method] = str(exc)
                import shutil

                shutil.rmtree(run_dir, ignore_errors=True)  # only the config/split written before the refusal
                break
            done.append(run_dir)
    if not done:
        raise NotApplicableError("no method could run: " + "; ".join(f"{k}: {v}" for k, v in not_applicable.items()))
    frame = collect_runs(done)
    atomic_write_bytes(out / "results.csv", frame.to_csv(index=False).encode())
    dataset = frame["dataset"].iloc[0]
    bar_chart(frame, out / "results.png", f"{dataset}: macro AUROC, mean ± std over seeds {seeds}")
    timing = frame.groupby("method", sort=False).agg(train_s=("train_s", "mean"),
                                                     params=("trainable_parameters", "first"))
    lines = [f"# Benchmark on {dataset}", "", f"Command: `{command}`" if command else "",
             f"Machine: {platform.machine()}, {torch.get_num_threads()} CPU threads, "
             f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}; "
             f"torch {torch.__version__}.", "",
             "Test split metrics (%), mean ± std over seeds (each seed = its own patient split and initialisation); "
             "F1/ACC at thresholds picked on the validation split, and F1 at the oracle threshold (the paper's "
             "protocol).", "", paper_table(frame), "", "| method | trainable parameters | train time (s, mean) |",
             "|---|---|---|"]
    for m, row in timing.iterrows():
        p = row["params"]
        lines.append(f"| {m} | {int(p):,} | {row['train_s']:.1f} |" if p is not None and np.isfinite(p)
                     else f"| {m} | - | {row['train_s']:.1f} |")
    if not_applicable:
        lines += ["", "Not applicable to this backbone:", ""] + [f"- {m}: {why}" for m, why in not_applicable.items()]
    atomic_write_bytes(out / "results.md", ("\n".join(lines) + "\n").encode())
    return {"runs": [str(d) for d in done], "not_applicable": not_applicable, "table": paper_table(frame),
            "results": str(out / "results.md")}


__all__ = ["run_benchmark", "bar_chart"]
