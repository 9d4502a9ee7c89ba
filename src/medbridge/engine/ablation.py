"""``medbridge ablate``: a grid of settings x seeds from a YAML study file, aggregated and plotted.

Settings are compared on the VALIDATION split (the choice of defaults must never see the test split); test
numbers are reported beside them, with the paired difference to the linear probe on the same split."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ..defaults import list_studies
from ..io import atomic_write_bytes
from .config import PRESET_DIR, ConfigError, load_config
from .report import save_figure
from .run import train_run

log = logging.getLogger(__name__)


def read_study(path_or_name: str) -> dict:
    p = Path(path_or_name) if path_or_name.endswith((".yaml", ".yml")) else PRESET_DIR / f"{path_or_name}.yaml"
    if not p.is_file():
        raise ConfigError(f"study file {path_or_name!r} not found (a YAML path or a shipped study: "
                          f"{', '.join(list_studies())})")
    study = yaml.safe_load(p.read_text())
    for key in ("studies", "seeds"):
        if key not in study:
            raise ConfigError(f"{p}: missing {key!r}")
    return study


def _overrides(d: dict) -> list[str]:
    """A study setting's {key: value} -> ``key=value`` overrides (YAML/JSON text, so null stays None)."""
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in d.items()]


def _metrics(run_dir: Path, method: str | None) -> dict:
    m = json.loads((run_dir / "metrics.json").read_text())
    method = method or next(iter(m["methods"]))  # the run's own method
    res = m["methods"][method]
    return {"val_auroc": res.get("val_macro", {}).get("auroc", np.nan), "test_auroc": res["macro"]["auroc"],
            "test_f1": res["macro"].get("f1", np.nan), "test_acc": res["macro"].get("acc", np.nan),
            "train_s": m["timings"].get("train_s", np.nan), "cache_s": m["timings"].get("cache_s", np.nan),
            "params": m["trainable_parameters"].get(method)}


def run_ablations(study_file: str, data: str, out: str | Path, *, only: list[str] | None = None,
                  seeds: list[int] | None = None, extra: list[str] | None = None,
                  progress: bool = False, train: bool = True) -> pd.DataFrame:
    study = read_study(study_file)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = seeds or study["seeds"]
    rows = []

    def one(name: str, setting: str, overrides: list[str], seed: int, method: str | None = None):
        run_dir = out / name / f"{setting.replace(' ', '_').replace('/', '-')}-s{seed}"
        if not (run_dir / "metrics.json").is_file():
            if not train:
                return  # summarising only: skip runs that have not finished
            chosen = [*([f"method={method}"] if method else []), "companions=[]"]  # one method per run
            # one model per seed (the study's seeds are its repetitions), unless a setting asks for an ensemble
            cfg = load_config(study.get("base"), None, [f"data.path={data}", f"train.seed={seed}", "train.ensemble=1",
                                                        f"data.split_seed={seed}", *chosen, *overrides,
                                                        *(extra or [])])
            train_run(cfg, run_dir, overwrite=True, progress=progress)
        rows.append({"study": name, "setting": setting, "seed": seed, **_metrics(run_dir, method)})
        log.info("%s / %s / seed %d: %s", name, setting, seed, rows[-1])

    for seed in seeds:
        for method in study.get("baselines", []):
            one("baselines", method, [], seed, method)
    for name, settings in study["studies"].items():
        if only and name not in only:
            continue
        for s in settings:
            for seed in seeds:
                one(name, s["name"], _overrides(s.get("set", {})), seed)
    frame = pd.DataFrame(rows)
    if frame.empty:
        raise ConfigError(f"{out}: no finished runs to summarise")
    atomic_write_bytes(out / "ablations.csv", frame.to_csv(index=False).encode())
    return frame


def summarise(frame: pd.DataFrame, out: Path) -> str:
    """Markdown tables per study (mean ± std over seeds; paired test difference to the study's first baseline,
    e.g. the linear probe) + plots."""
    refs = frame[frame["study"] == "baselines"]
    ref = str(refs["setting"].iloc[0]) if len(refs) else "reference"
    lp = refs[refs["setting"] == ref].set_index("seed")
    lines = []
    for name, g in frame[frame["study"] != "baselines"].groupby("study", sort=False):
        lines += [f"### {name}", "", f"| setting | val AUROC | test AUROC | test AUROC - {ref} (paired) | test F1 | "
                  "train s |", "|---|---|---|---|---|---|"]
        best = g.groupby("setting", sort=False)["val_auroc"].mean().idxmax()
        for setting, h in g.groupby("setting", sort=False):
            diff = (h.set_index("seed")["test_auroc"] - lp["test_auroc"]).dropna()

            def ms(v):
                v = 100 * np.asarray(v, dtype=float)
                return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v.mean():.2f}"
            mark = " **(best val)**" if setting == best else ""
            lines.append(f"| {setting}{mark} | {ms(h['val_auroc'])} | {ms(h['test_auroc'])} | "
                         f"{ms(diff) if len(diff) else '-'} | {ms(h['test_f1'])} | {h['train_s'].mean():.0f} |")
        lines.append("")
        plot_study(g, lp, out / f"ablation_{name}.png", name, ref)
    if len(lp):
        v = 100 * lp["test_auroc"]
        lines.insert(0, f"{ref} (same splits): test AUROC {v.mean():.2f} ± {v.std(ddof=1):.2f}; val "
                        f"{100 * lp['val_auroc'].mean():.2f}.\n")
    return "\n".join(lines)


def plot_study(g: pd.DataFrame, lp: pd.DataFrame, path: Path, title: str, ref: str = "reference") -> None:
    from matplotlib.figure import Figure

    agg = g.groupby("setting", sort=False).agg(val=("val_auroc", "mean"), val_sd=("val_auroc", "std"),
                                               test=("test_auroc", "mean"), test_sd=("test_auroc", "std"))
    x = np.arange(len(agg))
    fig = Figure(figsize=(1.5 + 1.1 * len(agg), 3.2))
    ax = fig.subplots()
    ax.errorbar(x - 0.05, 100 * agg["val"], 100 * agg["val_sd"].fillna(0), fmt="o-", capsize=3, label="validation")
    ax.errorbar(x + 0.05, 100 * agg["test"], 100 * agg["test_sd"].fillna(0), fmt="s--", capsize=3, label="test")
    if len(lp):
        ax.axhline(100 * lp["test_auroc"].mean(), color="grey", ls=":", label=f"{ref} (test)")
    ax.set_xticks(x, agg.index, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("macro AUROC (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path)
