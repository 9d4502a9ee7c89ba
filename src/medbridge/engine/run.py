"""Runs: data + split -> frozen-activation cache -> train -> evaluate -> run folder with every output."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..data import load_dataset, load_split, make_split, save_split
from ..data.cases import CaseTable, case_or_image_table
from ..data.splits import Split
from ..data.table import DatasetError, ImageTable
from ..io import atomic_write_bytes, check_finite
from ..methods.api import Method, options_dict
from ..methods.registry import OptionsError, check_method_options, create_method, get_method, load_method, save_method
from .cases import case_scores, image_rows_for, image_table, training_data, usable_rows
from .config import ConfigError, DataConfig, RunConfig, save_config
from .distributed import barrier, init_from_env, world
from .features import build_cache, cache_root_from, fixed_view_count
from .metrics import evaluate_scores, pick_thresholds
from .report import per_class_table, plot_roc, summary_table, write_json, write_predictions
from .runlock import run_lock
from .trainer import CHECKPOINT, fit_method

log = logging.getLogger(__name__)


def resolve_device(name: str, what: str = "train.device") -> str:
    from ..methods.inference import resolve_device as device_for

    try:
        return device_for(name, what)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def prepare_data(dc: DataConfig) -> tuple[ImageTable | CaseTable, Split]:
    """The run's table (images, or cases of several images by ``data.unit``) and its split."""
    if not dc.path:
        raise ConfigError("data.path: no dataset given (--data PATH)")
    table = load_dataset(dc.format, dc.path, **dc.options)
    if dc.views:
        table = table.filter_views(dc.views)
    table = case_or_image_table(table, dc.unit, dc.case_image_labels)
    if dc.split_file:
        split = load_split(dc.split_file, table)
    else:
        split = make_split(table, kind=dc.split, fractions=tuple(dc.fractions), seed=dc.split_seed,
                           label_frac=dc.label_fraction)
    if len(split.train) == 0:
        raise DatasetError(f"{table.name}: the training split is empty")
    return table, split


RUN_MARKER = ".medbridge-run"
#: keys of a run's config that may change on --resume: where/how things run, not what is computed
RESUMABLE_CHANGES = ("train.workers", "train.device", "train.cache_dir", "train.checkpoint_every",
                     "train.eval_batch_size", "eval.n_boot")


def is_run_folder(out: Path) -> bool:
    """Made by medbridge: it has the run marker (or, for older runs, a config.yaml with a split or metrics)."""
    return (out / RUN_MARKER).is_file() or ((out / "config.yaml").is_file() and any(
        (out / f).is_file() for f in ("split.json", "metrics.json")))


def prepare_out(out: Path, resume: bool, overwrite: bool = False) -> bool:
    """A run folder is never silently overwritten: it must be new/empty, or resumed, or --overwrite given (which
    replaces a medbridge run folder's contents and refuses any other folder). Returns True when it starts empty."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder: choose a folder path for the run")
    fresh = not (out.exists() and any(out.iterdir()))
    if not fresh:
        if resume:
            if not is_run_folder(out):
                raise FileExistsError(f"--resume: {out} is not a medbridge run folder (no {RUN_MARKER} or "
                                      "config.yaml): nothing to resume")
        elif overwrite:
            if not is_run_folder(out):
                raise FileExistsError(f"--overwrite: {out} was not made by medbridge (no {RUN_MARKER} or config.yaml"
                                      "); refusing to delete files medbridge did not write: choose another --out")
            clear_folder(out)
            fresh = True
        else:
            raise FileExistsError(f"output folder {out} exists and is not empty: choose another --out, continue it "
                                  "with --resume, or pass --overwrite (replaces the previous run)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / RUN_MARKER, b"medbridge run folder\n")
    except OSError as exc:
        raise OSError(f"--out {out}: cannot write there ({exc.strerror or exc})") from exc
    return fresh


def clear_folder(out: Path) -> None:
    """Delete everything inside a medbridge run folder (adapters, checkpoints, predictions of the old run)."""
    import shutil

    for entry in out.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


PATH_KEYS = ("data.path", "data.split_file")  # compared as absolute paths: nih60 and /abs/nih60 are one dataset


def same_paths(flat: dict) -> dict:
    import os

    return {k: os.path.abspath(os.path.expanduser(v)) if k in PATH_KEYS and isinstance(v, str) and v else v
            for k, v in flat.items()}


def check_resume_config(cfg: RunConfig, out: Path) -> None:
    """--resume continues the saved run only: a changed effective config is refused, naming the keys."""
    import yaml

    saved_file = out / "config.yaml"
    if not saved_file.is_file():
        return
    from .config import config_from_dict

    try:  # both through the current config form (runs saved by older versions use legacy sections)
        saved_cfg = config_from_dict(yaml.safe_load(saved_file.read_text()) or {})
    except (ConfigError, ValueError) as exc:
        raise ConfigError(f"--resume: {saved_file} cannot be read as a run config ({exc})") from exc
    saved = same_paths(flatten(json.loads(json.dumps(effective_config(saved_cfg), default=str))))
    now = same_paths(flatten(json.loads(json.dumps(effective_config(cfg), default=str))))
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k)
                  and not k.startswith(RESUMABLE_CHANGES))
    if diff:
        written = {}  # a change made through a method group is named as written, once for all its members
        for k in diff:
            written.setdefault(key_as_written(k, saved_cfg, cfg), k)
        shown = "; ".join(f"{w}: saved {saved.get(k)!r}, now {now.get(k)!r}" for w, k in list(written.items())[:6])
        raise ConfigError(f"--resume: the configuration differs from the run's {saved_file} ({shown}"
                          f"{' ...' if len(written) > 6 else ''}); resume with the same settings, or start a new "
                          "run (--out elsewhere, or --overwrite)")


def key_as_written(key: str, *cfgs: RunConfig) -> str:
    """``method_options.<method>.<option>`` as the user wrote it: ``method_options.<group>.<option>`` when the
    option is set through the method's group (``baseline: {epochs: 5}``) in ``cfgs`` and never on the method."""
    parts = key.split(".")
    if len(parts) != 3 or parts[0] != "method_options":
        return key
    _, name, option = parts
    try:
        group = get_method(name).group
    except OptionsError:  # a method no longer registered: name the key as it is
        return key
    if (group and any(option in c.method_options.get(group, {}) for c in cfgs)
            and not any(option in c.method_options.get(name, {}) for c in cfgs)):
        return f"method_options.{group}.{option}"
    return key


def effective_config(cfg: RunConfig) -> dict:
    """``cfg.to_dict()`` with ``method_options`` as the options each trained method actually gets, defaults
    included: an option given at its default (or one a newer version added) is not a change."""
    d = cfg.to_dict()
    d["method_options"] = {m: options_dict(check_method_options(m, cfg.options_for(m)))
                           for m in dict.fromkeys([cfg.method, *cfg.companions])}
    return d


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def method_scores(method: Method, table: ImageTable, rows: np.ndarray, cache_root: Path, device: str,
                  workers: int = 2, batch_size: int = 16, skip_unreadable: bool = False,
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Scores of ``method`` for ``rows`` of ``table`` through the cache (built as needed); returns the rows
    actually scored (unreadable images skipped) and their scores."""
    method.to(device)
    images = image_table(table)
    spec = method.cache_spec(fixed_view_count(images, method.focal))
    cache = build_cache(spec, images, image_rows_for(table, rows), root=cache_root, batch_size=batch_size,
                        workers=workers, device=device, skip_unreadable=skip_unreadable, progress=progress)
    rows = usable_rows(table, cache, rows)
    return rows, check_finite(case_scores(method, table, cache, rows, device), f"{method.name} scores")


def cache_for_split(spec, table: ImageTable, split: Split, cfg: RunConfig, device: str, cache_root: Path,
                    progress: bool, timings: dict, timing_key: str = "cache_s"):
    """Build (or reuse) the cache of every image of the split; returns it and the readable train/val/test rows."""
    rows = image_rows_for(table, np.concatenate([split.train, split.val, split.test]))
    t0 = time.perf_counter()
    cache = build_cache(spec, image_table(table), rows, root=cache_root, batch_size=cfg.train.batch_size,
                        workers=cfg.train.workers, device=device, amp=cfg.train.amp,
                        skip_unreadable=cfg.data.skip_unreadable, progress=progress, mode=cfg.train.cache,
                        budget=cfg.train.cache_budget)
    timings[timing_key] = time.perf_counter() - t0
    parts = [usable_rows(table, cache, r) for r in (split.train, split.val, split.test)]
    if len(parts[0]) < len(split.train):
        log.warning("%d training %s unreadable and skipped", len(split.train) - len(parts[0]),
                    "case(s) with no readable image" if isinstance(table, CaseTable) else "image(s)")
    check_usable(table, split, parts)
    return (cache, *parts)


def check_usable(table: ImageTable, split: Split, readable: list[np.ndarray]) -> None:
    """Training needs readable images with at least one label seen both positive and negative, and a test split
    that is not emptied by unreadable images; otherwise one error (never NaN weights or ``"auroc": NaN``)."""
    train, _, test = readable
    lost = sum(len(p) - len(r) for p, r in zip((split.train, split.val, split.test), readable))
    why = f" ({lost} unreadable image(s) skipped by data.skip_unreadable)" if lost else ""
    if len(train) == 0:
        raise DatasetError(f"{table.name}: none of the {len(split.train)} training image(s) could be read{why}: "
                           "nothing to train on")
    known = table.targets[train]
    both = (np.nansum(known == 1, axis=0) > 0) & (np.nansum(known == 0, axis=0) > 0)
    if not both.any():
        raise DatasetError(f"{table.name}: no label has both a positive and a negative among the {len(train)} "
                           f"readable training image(s){why}: nothing to learn")
    if len(split.test) and len(test) == 0:
        raise DatasetError(f"{table.name}: none of the {len(split.test)} test image(s) could be read{why}: nothing "
                           "to evaluate")


def evaluate_split(scores_val, targets_val, scores_test, targets_test, labels) -> dict:
    thresholds = pick_thresholds(scores_val, targets_val, labels) if scores_val is not None else None
    res = evaluate_scores(scores_test, targets_test, labels, thresholds)
    res["thresholds"] = thresholds
    if scores_val is not None:  # for model selection (ablations choose settings on validation only)
        res["val_macro"] = evaluate_scores(scores_val, targets_val, labels)["macro"]
    return res


def train_run(cfg: RunConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
              progress: bool = True, backbones: list | None = None, stop_after: int | None = None) -> dict:
    """Fit ``cfg.method`` and its ``cfg.companions`` on the same split (companions read the method's cache when
    they can), evaluate each on the test split with validation thresholds, and write the run folder.

    The metrics come from the saved method files, loaded back the way ``medbridge eval`` loads them, so a run's
    metrics.json and a later ``eval`` of its folder agree exactly. A run that fails before its first checkpoint
    leaves no files behind (the same --out works again)."""
    out = Path(out)
    device = resolve_device(cfg.train.device)
    rank, _ = init_from_env(device)
    fresh = False
    with run_lock(out) if rank == 0 else contextlib.nullcontext():  # one process per run folder
        if rank == 0:
            if resume and out.is_dir():
                check_resume_config(cfg, out)
            fresh = prepare_out(out, resume, overwrite)
        try:
            return _train_run(cfg, out, device, rank, resume, progress, backbones, stop_after)
        except BaseException:
            if rank == 0 and fresh and not any(out.rglob(CHECKPOINT)) and not (out / "metrics.json").is_file():
                clear_folder(out)  # nothing worth resuming: leave the folder as it was (empty)
            raise


def _train_run(cfg: RunConfig, out: Path, device: str, rank: int, resume: bool, progress: bool,
               backbones: list | None, stop_after: int | None) -> dict:
    from ..backbones import create_backbone

    t_start = time.perf_counter()
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
    torch.manual_seed(cfg.train.seed)  # before the backbones are built: their construction draws random numbers too
    backbones = backbones or [create_backbone(s) for s in cfg.backbones]
    focal = run_focal(cfg, table)
    timings, params, saved = {}, {}, {}
    shared = None  # (spec, cache, rows) of the run's method, for companions that can read it
    for k, name in enumerate([cfg.method, *cfg.companions]):
        if k:
            torch.manual_seed(cfg.train.seed)
        method = create_method(name, cfg.options_for(name), backbones=backbones, labels=list(table.labels),
                               prompt_names=list(table.prompt_names), focal=focal,
                               ensemble=cfg.train.ensemble_for(name), seed=cfg.train.seed)
        method.to(device)
        n_views = fixed_view_count(image_table(table), method.focal)
        if shared is not None and reads_cache(method, shared[0], shared[1], n_views):
            cache, rows = shared[1], shared[2]
        else:
            spec = method.cache_spec(n_views)
            cache, *rows = cache_for_split(spec, table, split, cfg, device, cache_root, progress, timings,
                                           "cache_s" if k == 0 else f"cache_s.{name}")
            shared = shared or (spec, cache, rows)
        train_rows, val_rows, test_rows = rows
        data = training_data(method, table, cache, train_rows, val_rows)
        t0 = time.perf_counter()
        history = fit_method(method, data, cfg.train, out if k == 0 else out / method.folder(), device=device,
                             resume=resume, progress_bar=progress, stop_after=stop_after if k == 0 else None)
        timings["train_s" if k == 0 else f"train_s.{name}"] = time.perf_counter() - t0
        if rank == 0:
            folder = save_method(method, out / method.folder(), extra={"dataset": table.name, "history": history})
            saved[name] = (folder, cache)
            params[name] = method.num_trainable()
    if rank != 0:
        return {"rank": rank}
    from .calibration import calibrate_fitted

    results, scores, raw = {}, {}, {}
    for name, (folder, cache) in saved.items():  # scored from the saved files, exactly as `medbridge eval` does
        trained = load_method(folder, backbones)
        trained.to(device)
        sv = check_finite(case_scores(trained, table, cache, val_rows, device), f"{folder}: validation scores") \
            if len(val_rows) else None
        scores[name] = check_finite(case_scores(trained, table, cache, test_rows, device), f"{folder}: test scores")
        sv, scores[name], raw[name] = calibrate_fitted(cfg.eval.calibrate, folder, sv, table.targets[val_rows],
                                                       scores[name], table.labels)
        results[name] = evaluate_split(sv, table.targets[val_rows], scores[name], table.targets[test_rows],
                                       table.labels)
    timings["total_s"] = time.perf_counter() - t_start
    return write_outputs(out, table, test_rows, results, scores, params, timings, cfg, split, raw)


def run_focal(cfg: RunConfig, table: ImageTable):
    """The run's focal views. Left at the defaults (no ``focal`` given) on images of different sizes, which would
    give different numbers of crops per image (the cache needs one count), the whole image is used, with a
    warning; so are images no larger than one region (ODIR's 256 px copies: the only crop would repeat the whole
    image). An explicit ``focal`` is kept as given (and refused with the reason when it cannot be cached)."""
    focal = cfg.focal_config()
    if cfg.focal:
        return focal
    whole_only = type(focal)(**{**focal.to_dict(), "num_crops": 0})
    try:
        n_views = fixed_view_count(image_table(table), focal)
    except DatasetError as exc:
        log.warning("%s; until then the whole image is used", exc)
        return whole_only
    if n_views == 2 and focal.include_whole and crops_repeat_whole(image_table(table), focal):
        log.info("images no larger than one focal region (%s px): the whole image is the only view",
                 focal.region_size)
        return whole_only
    return focal


def crops_repeat_whole(table: ImageTable, focal) -> bool:
    """Whether the first readable image's single focal crop covers the whole image (region >= its size)."""
    from PIL import Image

    for p in table.paths[:8]:
        try:
            with Image.open(p) as im:
                w, h = im.size
        except Exception:
            continue
        return focal.region_pixels(h, w) >= max(h, w)
    return False


def reads_cache(method: Method, spec, cache, n_views: int) -> bool:
    """Whether ``method`` can take its inputs from another method's cache (same frozen activations)."""
    needed = set(method.cache_spec(n_views).shapes)
    return method.reads(spec, n_views) and needed <= set(getattr(cache, "arrays", {}) or {})


def write_outputs(out: Path, table: ImageTable, test_rows, results, scores, params, timings, cfg: RunConfig,
                  split: Split, raw: dict | None = None) -> dict:
    from . import model_card as card
    from .report import ci_sentence, paired_table, plot_reliability
    from .stats import bootstrap_metrics, delong_per_class, paired_bootstrap
    from .subgroups import group_columns, subgroup_markdown, subgroup_results

    labels = list(table.labels)
    targets = table.targets[test_rows]
    patients = table.patient_ids[test_rows]
    n_boot, boot_seed = cfg.eval.n_boot, 0
    paired = {}
    if len(test_rows) and n_boot:  # 95% patient-bootstrap intervals; paired differences to the first method
        for method, s in scores.items():
            results[method]["ci"] = bootstrap_metrics(s, targets, labels, patients,
                                                      results[method].get("thresholds"), n_boot, boot_seed)
        names = list(scores)
        for other in names[1:]:
            pair = paired_bootstrap(scores[names[0]], scores[other], targets, labels, patients, n_boot, boot_seed)
            pair["delong"] = delong_per_class(scores[names[0]], scores[other], targets, labels)
            paired[f"{names[0]} - {other}"] = pair
    raw = {m: r for m, r in (raw or {}).items() if r is not None}
    for method, r in raw.items():  # before calibration, on the same draws
        results[method]["uncalibrated"] = card.uncalibrated_metrics(r, targets, labels, patients, n_boot, boot_seed)
    groups = {a: v[test_rows] for a, v in group_columns(table.meta).items()}
    subgroups = subgroup_results([{"targets": targets, "patients": patients, "scores": scores, "groups": groups}],
                                 labels, list(scores), n_boot, boot_seed) if len(test_rows) else {}
    cases = isinstance(table, CaseTable)
    unit = "cases" if cases else "images"
    summary = {"dataset": table.name, "unit": "case" if cases else "image", "n_images": len(image_table(table)),
               **({"n_cases": len(table)} if cases else {}),
               "split": {k: int(len(getattr(split, k))) for k in ("train", "val", "test")}, "split_info": split.info,
               "labels": labels, "methods": results, "paired": paired, "trainable_parameters": params,
               "timings": timings, "device": resolve_device(cfg.train.device),
               "torch_threads": torch.get_num_threads(),
               "bootstrap": {"n_boot": n_boot, "seed": boot_seed, "unit": "patient",
                             "test_patients": int(len(set(patients)))}, "subgroups": subgroups}
    from .challenge import challenge_lines, challenge_scores

    challenge = challenge_scores(table.notes.get("challenge"), scores, targets, patients, n_boot, boot_seed)
    if challenge:
        summary["challenge"] = challenge
    per_class = per_class_table(results)
    atomic_write_bytes(out / "per_class.csv", per_class.to_csv(index=False).encode())
    all_rel = table.relative_paths()
    rel = [all_rel[i] for i in test_rows]
    kept = {c: table.meta[c].to_numpy()[test_rows] for c in table.notes.get("prediction_columns", ())}  # licence
    for method, s in scores.items():
        write_predictions(out / f"predictions_{method}.csv", rel, labels, s, results[method].get("thresholds") or {},
                          {**kept, **card.raw_columns(raw.get(method), labels)})
    shown = {m: {**{lab: v["auroc"] for lab, v in r["per_class"].items()}, "macro": r["macro"]["auroc"]}
             for m, r in results.items()}
    plot_roc(out / "roc_curves.png", {m: (s, targets, labels) for m, s in scores.items()}, labels,
             patients if len(test_rows) and n_boot else None, n_boot=min(n_boot, 200), seed=boot_seed,
             legend_auroc=shown)
    plot_reliability(out / "reliability.png", {m: (s, targets) for m, s in scores.items()}, labels,
                     {m: {**{lab: v["ece"] for lab, v in r["per_class"].items()}, "macro": r["macro"]["ece"]}
                      for m, r in results.items()})
    extra = {m: {"trainable params": f"{params.get(m, 0):,}"} for m in results}
    first = results[next(iter(results))]
    split_text = (f"Split {summary['split']} ({split.info}); test metrics on {len(test_rows)} {unit} of "
                  f"{summary['bootstrap']['test_patients']} patients, thresholds picked on validation (honest) and on "
                  "the test set itself (oracle, the paper's protocol).")
    lines = card.card_head(f"medbridge run: {cfg.method} on {table.name}", cfg, table, split_text, params)
    lines += ["## Metrics", "", summary_table(results, extra), "",
              ci_sentence(n_boot, boot_seed) if n_boot else "No intervals (n_boot = 0).", "",
              *challenge_lines(challenge)]
    if paired:
        lines += ["Paired comparison on the same test images (patient bootstrap of the macro AUROC difference):",
                  "", paired_table(paired), ""]
    dropped = {m: r["ci"]["dropped"] for m, r in results.items() if r.get("ci", {}).get("dropped")}
    lines += [f"Classes evaluated: {first['classes']}; skipped (no positives or no negatives in test): "
              f"{first['skipped']}." + (f" Resamples in which a class had no positive or no negative (left out of "
                                       f"that resample's macro): {dropped}." if dropped else ""), "",
              "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), "",
              "Files: metrics.json, per_class.csv, predictions_<method>.csv, roc_curves.png/.svg, "
              "reliability.png/.svg, config.yaml, split.json, and one folder per method (adapter.safetensors + "
              "adapter.json).", "",
              "![ROC curves with 95% patient-bootstrap bands](roc_curves.png)", "",
              "Per class (test AUROC, 95% interval):", "", markdown_pivot(per_class, "auroc")]
    if paired:
        for name, pair in paired.items():
            lines += ["", f"Per class, {name}: AUROC difference (patient bootstrap) and DeLong's test:", "",
                      "| label | difference [95% CI] | bootstrap p | DeLong z | DeLong p |", "|---|---|---|---|---|"]
            from .stats import fmt_diff, fmt_p

            for lab, d in pair.get("per_class", {}).items():
                dl = pair["delong"].get(lab, {})
                lines.append(f"| {lab} | {fmt_diff({k: d[k] for k in ('diff', 'ci')})} | {fmt_p(d['p'])} | "
                             f"{dl.get('z', float('nan')):+.2f} | {fmt_p(dl['p']) if dl else '-'} |")
    lines += ["", *card.card_calibration(results, cfg.eval.calibrate),
              *card.card_subgroups(subgroup_markdown(subgroups, list(results))),
              *card.card_limitations(results, table, subgroups, summary["bootstrap"]["test_patients"],
                                     calibrated=bool(raw)), *card.card_command()]
    atomic_write_bytes(out / "report.md", ("\n".join(lines) + "\n").encode())
    write_json(out / "metrics.json", summary)  # last: a run folder with metrics.json is complete
    return summary


def markdown_pivot(per_class, value: str) -> str:
    """label x method table of one metric, as Markdown (with its 95% interval when the table has one)."""
    from .stats import fmt_class

    if per_class.empty:
        return "(no class with positives and negatives in the test split)"
    pivot = per_class.pivot(index="label", columns="method", values=value)
    has_ci = f"{value}_lo" in per_class and per_class[f"{value}_lo"].notna().any()
    lo = per_class.pivot(index="label", columns="method", values=f"{value}_lo") if has_ci else None
    hi = per_class.pivot(index="label", columns="method", values=f"{value}_hi") if has_ci else None
    lines = ["| label | " + " | ".join(pivot.columns) + " |", "|---" * (len(pivot.columns) + 1) + "|"]
    for label, row in pivot.iterrows():
        pos = per_class.pivot(index="label", columns="method", values="positives") if "negatives" in per_class else None
        neg = per_class.pivot(index="label", columns="method", values="negatives") if pos is not None else None
        cells = [fmt_class(v, [lo.loc[label, m], hi.loc[label, m]] if has_ci else None,
                           None if pos is None else pos.loc[label, m], None if neg is None else neg.loc[label, m])
                 for m, v in row.items()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
