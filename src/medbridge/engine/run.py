"""Runs: data + split -> frozen-activation cache -> train -> evaluate -> run folder with every output."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..data import load_dataset, load_split, make_split, save_split
from ..data.splits import Split
from ..data.table import DatasetError, ImageTable
from ..methods.linear_probe import ProbeConfig, fit_linear_probe
from ..methods.medbridge.adapter import build_medbridge, save_adapter
from .config import ConfigError, DataConfig, RunConfig, save_config
from .distributed import barrier, init_from_env, world
from .features import build_cache, cache_root_from, fixed_view_count
from .methods_io import (
    MedBridgeMethod,
    TrainedMethod,
    baseline_cache_spec,
    baseline_features,
    cached_probe_features,
    embedding_cache_spec,
)
from .metrics import evaluate_scores, pick_thresholds
from .report import per_class_table, plot_roc, summary_table, write_json, write_predictions
from .trainer import train_medbridge

log = logging.getLogger(__name__)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA GPU is visible; use cpu or auto")
    return name


def prepare_data(dc: DataConfig) -> tuple[ImageTable, Split]:
    if not dc.path:
        raise ConfigError("data.path: no dataset given (--data PATH)")
    table = load_dataset(dc.format, dc.path, **dc.options)
    if dc.views:
        table = table.filter_views(dc.views)
    if dc.split_file:
        split = load_split(dc.split_file, table)
    else:
        split = make_split(table, kind=dc.split, fractions=tuple(dc.fractions), seed=dc.split_seed,
                           label_frac=dc.label_fraction)
    if len(split.train) == 0:
        raise DatasetError(f"{table.name}: the training split is empty")
    return table, split


def prepare_out(out: Path, resume: bool, overwrite: bool = False) -> None:
    """A run folder is never silently overwritten: it must be new/empty, or resumed, or --overwrite given."""
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise FileExistsError(f"output folder {out} exists and is not empty: choose another --out, continue it "
                              "with --resume, or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)


def method_scores(method: TrainedMethod, table: ImageTable, rows: np.ndarray, cache_root: Path, device: str,
                  workers: int = 2, batch_size: int = 16, skip_unreadable: bool = False,
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Scores of ``method`` for ``rows`` of ``table`` through the cache (built as needed); returns the rows
    actually scored (unreadable images skipped) and their scores."""
    method.to(device)
    spec = method.cache_spec(fixed_view_count(table, method.focal))
    cache = build_cache(spec, table, rows, root=cache_root, batch_size=batch_size, workers=workers, device=device,
                        skip_unreadable=skip_unreadable, progress=progress)
    done = cache.done()
    rows = np.asarray(rows)[done[np.asarray(rows)]]
    return rows, method.scores_cached(cache, rows, device)


def cache_for_split(spec, table: ImageTable, split: Split, cfg: RunConfig, device: str, cache_root: Path,
                    progress: bool, timings: dict):
    """Build (or reuse) the cache of every image of the split; returns it and the readable train/val/test rows."""
    rows = np.concatenate([split.train, split.val, split.test])
    t0 = time.perf_counter()
    cache = build_cache(spec, table, rows, root=cache_root, batch_size=cfg.train.batch_size,
                        workers=cfg.train.workers, device=device, amp=cfg.train.amp,
                        skip_unreadable=cfg.data.skip_unreadable, progress=progress)
    timings["cache_s"] = time.perf_counter() - t0
    done = cache.done()
    parts = [r[done[r]] for r in (split.train, split.val, split.test)]
    if len(parts[0]) < len(split.train):
        log.warning("%d training image(s) unreadable and skipped", len(split.train) - len(parts[0]))
    return (cache, *parts)


def evaluate_split(scores_val, targets_val, scores_test, targets_test, labels) -> dict:
    thresholds = pick_thresholds(scores_val, targets_val, labels) if scores_val is not None else None
    res = evaluate_scores(scores_test, targets_test, labels, thresholds)
    res["thresholds"] = thresholds
    if scores_val is not None:  # for model selection (ablations choose settings on validation only)
        res["val_macro"] = evaluate_scores(scores_val, targets_val, labels)["macro"]
    return res


def train_run(cfg: RunConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
              progress: bool = True, backbones=None, with_probe: bool = False, stop_after: int | None = None) -> dict:
    """Train ``cfg.method`` (and, with ``with_probe``, a linear probe on the same cached frozen features and
    split), evaluate on the test split with validation thresholds, and write the run folder."""
    out = Path(out)
    t_start = time.perf_counter()
    device = resolve_device(cfg.train.device)
    rank, _ = init_from_env(device)
    if rank == 0:
        prepare_out(out, resume, overwrite)
    table, split = prepare_data(cfg.data)
    if rank == 0:
        save_config(cfg, out / "config.yaml")
        if not (resume and (out / "split.json").is_file()):
            save_split(split, table, out / "split.json")
    barrier()
    if resume and (out / "split.json").is_file():
        split = load_split(out / "split.json", table)
    if device == "cuda" and world()[1] > 1:
        device = f"cuda:{rank % torch.cuda.device_count()}"
    cache_root = cache_root_from(cfg.train.cache_dir)
    torch.manual_seed(cfg.train.seed)
    timings, results, scores, params = {}, {}, {}, {}
    if cfg.method == "medbridge":
        model = build_medbridge(cfg.medbridge_config(table.labels, table.prompt_names), backbones)
        method = MedBridgeMethod(model)
        model.to(device)
        spec = method.cache_spec(fixed_view_count(table, model.config.focal))
        cache, train_rows, val_rows, test_rows = cache_for_split(spec, table, split, cfg, device, cache_root,
                                                                 progress, timings)
        t0 = time.perf_counter()
        history = train_medbridge(model, cache, table.targets, train_rows, cfg.train, out, val_rows,
                                  reports=table.reports if model.config.report_weight > 0 else None,
                                  device=device, resume=resume, progress_bar=progress, stop_after=stop_after)
        timings["train_s"] = time.perf_counter() - t0
        if rank != 0:
            return {"rank": rank, "history": history}
        save_adapter(model, out / "medbridge", extra={"dataset": table.name, "history": history})
        params["medbridge"] = model.parameter_report()["trainable"]
        sv = method.scores_cached(cache, val_rows, device) if len(val_rows) else None
        scores["medbridge"] = method.scores_cached(cache, test_rows, device)
        results["medbridge"] = evaluate_split(sv, table.targets[val_rows], scores["medbridge"],
                                              table.targets[test_rows], table.labels)
        backbones = list(model.backbones)
        focal = model.config.focal
        probe_cache = cache
    elif cfg.method not in ("linear-probe",):
        backbones, results, scores, params, timings, test_rows = _train_baseline(
            cfg, table, split, out, device, cache_root, backbones, progress, timings)
        with_probe = False
        if rank != 0:
            return {"rank": rank}
    else:
        from ..backbones import create_backbone

        names = cfg.model.get("backbones", ["dinov2-small+minilm-l6"])
        backbones = backbones or [create_backbone(s) for s in names]
        from ..data.focal import FocalConfig

        focal = FocalConfig(**cfg.model.get("focal", {}))
        for b in backbones:
            b.to(device)
        spec = embedding_cache_spec(backbones, focal, fixed_view_count(table, focal))
        probe_cache, train_rows, val_rows, test_rows = cache_for_split(spec, table, split, cfg, device, cache_root,
                                                                       progress, timings)
        with_probe = True
        if rank != 0:
            return {"rank": rank}
    if with_probe:
        pc = ProbeConfig(**cfg.probe)
        t0 = time.perf_counter()
        feats = {name: cached_probe_features(probe_cache, r, len(backbones), pc.features, focal.include_whole).numpy()
                 for name, r in (("train", train_rows), ("val", val_rows), ("test", test_rows))}
        meta = {"backbones": [b.name for b in backbones], "focal": focal.to_dict(),
                "prompt_names": list(table.prompt_names), "dataset": table.name}
        probe, info = fit_linear_probe(feats["train"], table.targets[train_rows],
                                       feats["val"] if len(val_rows) else None,
                                       table.targets[val_rows] if len(val_rows) else None,
                                       list(table.labels), pc, meta)
        timings["probe_fit_s"] = time.perf_counter() - t0
        timings.setdefault("train_s", timings["probe_fit_s"])
        probe.save(out / "linear_probe")
        params["linear-probe"] = int(probe.weight.numel() + probe.bias.numel())
        with torch.no_grad():
            sv = torch.sigmoid(probe(torch.from_numpy(feats["val"]))).numpy() if len(val_rows) else None
            scores["linear-probe"] = torch.sigmoid(probe(torch.from_numpy(feats["test"]))).numpy()
        results["linear-probe"] = evaluate_split(sv, table.targets[val_rows], scores["linear-probe"],
                                                 table.targets[test_rows], table.labels)
    timings["total_s"] = time.perf_counter() - t_start
    summary = write_outputs(out, table, test_rows, results, scores, params, timings, cfg, split)
    return summary


def _train_baseline(cfg: RunConfig, table: ImageTable, split: Split, out: Path, device: str, cache_root: Path,
                    backbones, progress: bool, timings: dict):
    """A feature-space baseline on the cached whole-image embedding of one backbone."""
    from dataclasses import fields, replace

    from ..backbones import create_backbone
    from ..methods.baselines import Hparams, build_baseline, fit_feature_method, save_baseline

    names = cfg.model.get("backbones", ["dinov2-small+minilm-l6"])
    backbone = (backbones or [create_backbone(names[0])])[0]
    hp_keys = {f.name for f in fields(Hparams)}
    opts = dict(cfg.baseline)
    hp_over = {k: opts.pop(k) for k in list(opts) if k in hp_keys}
    method = build_baseline(cfg.method, backbone, list(table.labels), list(table.prompt_names), **opts).to(device)
    hp = replace(method.default_hparams, **hp_over)
    spec = baseline_cache_spec(method)
    cache, train_rows, val_rows, test_rows = cache_for_split(spec, table, split, cfg, device, cache_root, progress,
                                                             timings)

    def feats(r):
        return baseline_features(cache, r, method).to(device)

    y = torch.from_numpy(table.targets).to(device)
    t0 = time.perf_counter()
    info = fit_feature_method(method, feats(train_rows), y[train_rows],
                              feats(val_rows) if len(val_rows) else None, y[val_rows] if len(val_rows) else None,
                              hp, seed=cfg.train.seed, progress=progress)
    timings["train_s"] = time.perf_counter() - t0
    save_baseline(method, out / cfg.method, extra={"fit": info, "hparams": hp.__dict__})
    with torch.no_grad():
        sv = torch.sigmoid(method(feats(val_rows))).cpu().numpy() if len(val_rows) else None
        st = torch.sigmoid(method(feats(test_rows))).cpu().numpy()
    res = {cfg.method: evaluate_split(sv, table.targets[val_rows], st, table.targets[test_rows], table.labels)}
    params = {cfg.method: sum(p.numel() for p in method.trainable_parameters().values())}
    return [backbone], res, {cfg.method: st}, params, timings, test_rows


def write_outputs(out: Path, table: ImageTable, test_rows, results, scores, params, timings, cfg: RunConfig,
                  split: Split) -> dict:
    labels = list(table.labels)
    summary = {"dataset": table.name, "n_images": len(table),
               "split": {k: int(len(getattr(split, k))) for k in ("train", "val", "test")}, "split_info": split.info,
               "labels": labels, "methods": results, "trainable_parameters": params, "timings": timings,
               "device": resolve_device(cfg.train.device), "torch_threads": torch.get_num_threads()}
    write_json(out / "metrics.json", summary)
    per_class = per_class_table(results)
    (out / "per_class.csv").write_text(per_class.to_csv(index=False))
    all_rel = table.relative_paths()
    rel = [all_rel[i] for i in test_rows]
    for method, s in scores.items():
        write_predictions(out / f"predictions_{method}.csv", rel, labels, s, results[method].get("thresholds") or {})
    targets = table.targets[test_rows]
    plot_roc(out / "roc_curves.png", {m: (s, targets, labels) for m, s in scores.items()}, labels)
    extra = {m: {"trainable params": f"{params.get(m, 0):,}"} for m in results}
    lines = [f"# medbridge run: {cfg.method} on {table.name}", "",
             f"Data: {cfg.data.path} ({len(table)} images, {table.meta['patient_id'].nunique()} patients); split "
             f"{summary['split']} ({split.info}); test metrics, thresholds picked on validation (honest) and on "
             "the test set itself (oracle, the paper's protocol).", "", summary_table(results, extra), "",
             f"Classes evaluated: {results[next(iter(results))]['classes']}; skipped (no positives or no negatives "
             f"in test): {results[next(iter(results))]['skipped']}.", "",
             "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), "",
             "Files: metrics.json, per_class.csv, predictions_<method>.csv, roc_curves.png, config.yaml, "
             "split.json, medbridge/ (adapter), linear_probe/ (probe).", "",
             "Per class (test AUROC):", "", markdown_pivot(per_class, "auroc")]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return summary


def markdown_pivot(per_class, value: str) -> str:
    """label x method table of one metric, as Markdown."""
    if per_class.empty:
        return "(no class with positives and negatives in the test split)"
    pivot = per_class.pivot(index="label", columns="method", values=value)
    lines = ["| label | " + " | ".join(pivot.columns) + " |", "|---" * (len(pivot.columns) + 1) + "|"]
    for label, row in pivot.iterrows():
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    return "\n".join(lines)
