"""``medbridge benchmark``: several methods on the same data, split, seeds and backbone -> paper-style table."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..io import atomic_write_bytes
from ..methods.api import NotApplicableError
from .config import RunConfig, config_from_dict
from .report import collect_runs, paper_table, save_figure
from .run import train_run
from .stats import DEFAULT_N_BOOT

log = logging.getLogger(__name__)


def bar_chart(frame: pd.DataFrame, path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    g = frame.groupby("method", sort=False)["auroc"]
    mean, std = 100 * g.mean(), 100 * g.std(ddof=1).fillna(0)
    fig = Figure(figsize=(1.2 + 0.9 * len(mean), 3.4))
    ax = fig.subplots()
    ax.bar(range(len(mean)), mean.values, yerr=std.values, capsize=4, color="#4C72B0")
    ax.set_xticks(range(len(mean)), mean.index, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("macro AUROC (%)")
    lo = max(0.0, float((mean - std).min()) - 5)
    ax.set_ylim(lo, min(100.0, float((mean + std).max()) + 3))
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def run_benchmark(base: RunConfig, methods: list[str], seeds: list[int], out: str | Path, *,
                  progress: bool = True, command: str = "", cv: int | None = None) -> dict:
    """Train and evaluate every (method, seed) in ``out/<method>-s<seed>/`` (finished runs are reused, so an
    interrupted benchmark continues), then write ``results.md``, ``results.csv`` and ``results.png``. With
    ``cv=K`` each (method, seed) is a K-fold patient cross-validation (same folds for every method of a seed).
    Every method is compared with the first one on the same test images: paired macro AUROC difference with its
    patient-bootstrap interval and p-value (mean over folds, stratified by fold, with ``cv``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done, not_applicable = [], {}
    for method in methods:
        for seed in seeds:
            d = base.to_dict()
            d["method"] = method
            d["companions"] = []
            d["train"]["seed"] = seed
            d["data"]["split_seed"] = seed
            cfg = config_from_dict(d)
            run_dir = out / f"{method}-s{seed}"
            if (run_dir / "metrics.json").is_file():
                done.append(run_dir)
                continue
            try:
                if cv:
                    from .cv import run_cv

                    run_cv(cfg, cv, run_dir, overwrite=True, progress=progress)
                else:
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
    paired = paired_to_first(done, methods, seeds, cv, base.eval.n_boot)
    atomic_write_bytes(out / "results.csv", frame.to_csv(index=False).encode())
    dataset = frame["dataset"].iloc[0]
    bar_chart(frame, out / "results.png", f"{dataset}: macro AUROC, mean ± std over seeds {seeds}")
    timing = frame.groupby("method", sort=False).agg(train_s=("train_s", "mean"),
                                                     params=("trainable_parameters", "first"))
    lines = [f"# Benchmark on {dataset}", "", f"Command: `{command}`" if command else "",
             f"Machine: {platform.machine()}, {torch.get_num_threads()} CPU threads, "
             f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}; "
             f"torch {torch.__version__}.", "",
             (f"{cv}-fold patient cross-validation: mean over folds" if cv else "Test split metrics")
             + " (%): one seed -> the value with its 95% patient-bootstrap interval"
             + (" (stratified by fold)" if cv else "") + "; several seeds -> mean ± std over seeds (each seed = its "
             "own patient split and initialisation). F1/ACC at thresholds picked on the validation split, and F1 at "
             "the oracle threshold (the paper's protocol).", "", paper_table(frame), "",
             "Paired differences of macro AUROC to the first method on the same test images (interval excludes 0: a "
             "real difference; contains 0: a tie):", "", paired, "",
             "| method | trainable parameters | train time (s, mean) |", "|---|---|---|"]
    for m, row in timing.iterrows():
        p = row["params"]
        lines.append(f"| {m} | {int(p):,} | {row['train_s']:.1f} |" if p is not None and np.isfinite(p)
                     else f"| {m} | - | {row['train_s']:.1f} |")
    if not_applicable:
        lines += ["", "Not applicable to this backbone:", ""] + [f"- {m}: {why}" for m, why in not_applicable.items()]
    atomic_write_bytes(out / "results.md", ("\n".join(lines) + "\n").encode())
    return {"runs": [str(d) for d in done], "not_applicable": not_applicable, "table": paper_table(frame),
            "paired": paired, "results": str(out / "results.md")}


def paired_to_first(done: list[Path], methods: list[str], seeds: list[int], cv: int | None,
                    n_boot: int = DEFAULT_N_BOOT) -> str:
    """Markdown table: per seed, every method minus the first finished one on the same images."""
    from .stats import fmt_diff, verdict

    by_name = {Path(d).name: Path(d) for d in done}
    ran = [m for m in methods if any(f"{m}-s{s}" in by_name for s in seeds)]
    if len(ran) < 2:
        return "(fewer than two methods ran)"
    lines = ["| seed | comparison | macro AUROC difference [95% CI], p | reading |", "|---|---|---|---|"]
    base = ran[0]
    for seed in seeds:
        a_dir = by_name.get(f"{base}-s{seed}")
        for m in ran[1:]:
            b_dir = by_name.get(f"{m}-s{seed}")
            if a_dir is None or b_dir is None:
                continue
            pair = paired_difference(a_dir, base, b_dir, m, n_boot)
            lines.append(f"| {seed} | {base} - {m} | {fmt_diff(pair)} | {verdict(pair, base, m)} |")
    return "\n".join(lines)


def paired_difference(a_dir: Path, a: str, b_dir: Path, b: str, n_boot: int = DEFAULT_N_BOOT) -> dict:
    """Paired macro AUROC difference ``a - b`` of two finished runs scored on the same test images: two
    single-split runs with the same split (patient bootstrap), or two ``--cv`` runs with the same folds (mean over
    folds, bootstrap stratified by fold)."""
    import json

    a_dir, b_dir = Path(a_dir), Path(b_dir)
    cv_a = json.loads((a_dir / "metrics.json").read_text()).get("protocol") == "cv"
    cv_b = json.loads((b_dir / "metrics.json").read_text()).get("protocol") == "cv"
    if cv_a != cv_b:
        raise ValueError(f"{a_dir} and {b_dir}: one is a cross-validation run and the other is not: not paired")
    return (_paired_cv if cv_a else _paired_split)(a_dir, a, b_dir, b, n_boot)


def _scores(run_dir: Path, method: str, images: list[str] | None = None):
    frame = pd.read_csv(run_dir / f"predictions_{method}.csv").set_index("image")
    if images is not None:
        missing = sorted(set(images) - set(frame.index))
        if missing or len(frame) != len(images):
            raise ValueError(f"{run_dir}: {method} was not scored on the same test images ({len(missing)} missing, "
                             f"e.g. {missing[:1]}): runs must share the split (same data and seed)")
        frame = frame.loc[images]
    return list(frame.index), frame[[c for c in frame.columns if c.startswith("p_")]].to_numpy(np.float64)


def _run_table(run_dir: Path, no_split_file: bool = False):
    from dataclasses import replace

    import yaml

    from .config import config_from_dict
    from .run import prepare_data

    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    table, _ = prepare_data(replace(cfg.data, split_file=None) if no_split_file else cfg.data)
    return table


def _paired_split(a_dir: Path, a: str, b_dir: Path, b: str, n_boot: int) -> dict:
    """Paired bootstrap of two single-split runs with the same split (same test images)."""
    from .stats import paired_bootstrap

    table = _run_table(a_dir, no_split_file=True)
    images, sa = _scores(a_dir, a)
    _, sb = _scores(b_dir, b, images)
    where = {p: i for i, p in enumerate(table.relative_paths())}
    rows = np.array([where[p] for p in images])
    return paired_bootstrap(sa, sb, table.targets[rows], table.labels, table.patient_ids[rows], n_boot)


def _paired_cv(a_dir: Path, a: str, b_dir: Path, b: str, n_boot: int) -> dict:
    """Mean-over-folds paired difference of two CV runs with the same folds (bootstrap stratified by fold)."""
    import json

    from .cv import load_fold_predictions
    from .stats import cv_bootstrap

    table = _run_table(a_dir, no_split_file=True)
    k = json.loads((a_dir / "metrics.json").read_text())["folds"]
    if json.loads((b_dir / "metrics.json").read_text())["folds"] != k:
        raise ValueError(f"{a_dir} and {b_dir}: different numbers of folds: not paired")
    folds = []
    for f in range(k):
        rows, sa, ta = load_fold_predictions(a_dir / f"fold-{f}", table, a)
        rows_b, sb, tb = load_fold_predictions(b_dir / f"fold-{f}", table, b)
        if not np.array_equal(np.sort(rows), np.sort(rows_b)):
            raise ValueError(f"{a_dir} and {b_dir}: fold {f} tested different images (different folds or seeds?)")
        sb = sb[np.argsort(rows_b)][np.argsort(np.argsort(rows))]  # b's scores in a's image order
        folds.append({"targets": table.targets[rows], "patients": table.patient_ids[rows],
                      "scores": {"a": sa, "b": sb}, "thresholds": {"a": ta, "b": tb}})
    return cv_bootstrap(folds, table.labels, n_boot, 0, ["a", "b"])["paired"]["a - b"]


def paired_rows(frame: pd.DataFrame, n_boot: int = DEFAULT_N_BOOT) -> str:
    """Markdown: every (run, method) of a collect table minus the first one, paired on the same test images."""
    from .stats import fmt_diff, verdict

    first = frame.iloc[0]
    a_name = f"{Path(first['run']).name}:{first['method']}"
    lines = [f"Paired differences of macro AUROC, run minus {a_name} (same test images; interval excludes 0: a real "
             "difference, contains 0: a tie):", "", "| run:method | difference [95% CI], p | reading |",
             "|---|---|---|"]
    for _, row in frame.iloc[1:].iterrows():
        b_name = f"{Path(row['run']).name}:{row['method']}"
        try:
            pair = paired_difference(Path(row["run"]), row["method"], Path(first["run"]), first["method"], n_boot)
            lines.append(f"| {b_name} | {fmt_diff(pair)} | {verdict(pair, b_name, a_name)} |")
        except (ValueError, FileNotFoundError) as exc:
            lines.append(f"| {b_name} | not paired: {exc} | - |")
    return "\n".join(lines)
