"""``medbridge train / eval / predict / demo``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..defaults import list_studies
from .options import add_shared_options, config_overrides
from .outputs import removed_on_failure

SHARED_SAMPLE = "../shared/data/nih-cxr14-sample"
NIH_DOWNLOAD = "https://nihcc.app.box.com/v/ChestXray-NIHCC"


TRAIN_EXAMPLES = """examples:
  medbridge train --data /data/nih --format nih --out runs/nih-medbridge
  medbridge train --preset cross-domain --data /data/mimic-cxr-jpg --out runs/mimic --set data.label_fraction=0.1
  medbridge train --data labels.csv --method linear-probe --out runs/lp
  medbridge train --data /data/nih --out runs/nih --set method_options.medbridge.num_queries=16 --set train.lr=1e-3
  medbridge train ... --resume          # continue an interrupted run in the same --out folder
  torchrun --nproc_per_node 4 -m medbridge train ...   # data-parallel on 4 GPUs
presets: {presets}"""


def add_common_data(p: argparse.ArgumentParser, required: bool = True, default: str | None = None) -> None:
    p.add_argument("--data", required=required, default=default,
                   help="dataset folder (official layout) or CSV/TSV file" + (f" (default: {default})" if default
                                                                              else ""))
    p.add_argument("--format", default="auto", help="a registered dataset format (medbridge list datasets; plugins "
                                                    "add their own) or auto (detect from the files; default)")


def add_config_args(p: argparse.ArgumentParser, presets: list[str]) -> None:
    """--preset / --config / --backbone: the layers of a run's configuration (--set: the shared options)."""
    p.add_argument("--preset", help=f"config preset: {', '.join(presets)} or a YAML path")
    p.add_argument("--config", action="append", help="YAML config file(s) applied after the preset")
    p.add_argument("--backbone", action="append", help="backbone source(s); several = mixture of experts")
    from ..defaults import CACHE_MODES

    p.add_argument("--cache", choices=list(CACHE_MODES),
                   help="what to cache of the frozen path (train.cache; default auto: the fastest that fits)")
    p.add_argument("--cache-budget", metavar="SIZE",
                   help="disk budget of the cache: 50G, 500M, or 30%% of the free space (train.cache_budget)")


def build_run_config(args: argparse.Namespace):
    from ..data.datasets.registry import default_preset, get_dataset
    from ..engine.config import load_config

    overrides = config_overrides(args)
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.format and args.format != "auto":
        get_dataset(args.format)  # an unknown format: one line with close matches (plugins are loaded by now)
        overrides.append(f"data.format={args.format}")
    preset = args.preset
    found = default_preset(args.format, args.data) if args.data and not preset and not args.config else None
    if found:
        preset = found[1]
        print(f"medbridge: {found[0]} data: using the dataset's default preset {preset!r} (--preset or --config "
              "chooses another)", file=sys.stderr)
    if getattr(args, "method", None):
        overrides.append(f"method={args.method}")
    if getattr(args, "backbone", None):
        overrides.append("backbones=" + json.dumps(args.backbone))
    also = [m.strip() for m in (getattr(args, "also", None) or "").split(",") if m.strip()]
    if getattr(args, "with_probe", False):
        from ..methods.registry import probe_method

        also.append(probe_method())
    if also:
        overrides.append("companions=" + json.dumps(list(dict.fromkeys(also))))
    if getattr(args, "split_file", None):
        overrides.append(f"data.split_file={args.split_file}")
    if getattr(args, "cache", None):
        overrides.append(f"train.cache={args.cache}")
    if getattr(args, "cache_budget", None):
        overrides.append(f"train.cache_budget={args.cache_budget}")
    return load_config(preset, args.config, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from ..engine.run import train_run

    cfg = build_run_config(args)
    try:
        with removed_on_failure(args.out):
            summary = train_run(cfg, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the last checkpoint is in {args.out}; continue with the same command plus --resume",
              file=sys.stderr)
        return 130
    print_summary(summary, Path(args.out))
    return 0


def print_summary(summary: dict, out: Path) -> None:
    from ..engine.report import ci_sentence, paired_table, summary_table

    print(summary_table(summary["methods"], {m: {"trainable params": f"{n:,}"}
                                             for m, n in summary["trainable_parameters"].items()}))
    if summary.get("paired"):
        print("\n" + paired_table(summary["paired"]))
    boot = summary.get("bootstrap", {})
    if boot.get("n_boot"):
        print("\n" + ci_sentence(boot["n_boot"], boot["seed"]))
    print(f"\nrun folder: {out}  (report.md, metrics.json, per_class.csv, roc_curves.png, predictions_*.csv)")


def cmd_train_cv(args: argparse.Namespace) -> int:
    """``train --cv K``: patient-level K-fold cross-validation into one run folder."""
    from ..engine.cv import cv_headline, parse_folds, run_cv

    cfg = build_run_config(args)
    if cfg.data.split_file:
        raise ValueError("--cv and --split-file exclude each other: cross-validation makes its own patient folds")
    folds = parse_folds(args.folds, args.cv) if args.folds is not None else None
    try:
        summary = run_cv(cfg, args.cv, args.out, resume=args.resume, overwrite=args.overwrite,
                         progress=not args.quiet, folds=folds)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished folds are kept in {args.out}; continue with the same command plus --resume",
              file=sys.stderr)
        return 130
    if summary.get("partial"):
        for f, macro in summary["fold_macro_auroc"].items():
            print(f"fold {f}: test macro AUROC " + ", ".join(f"{m} {100 * v:.1f}" for m, v in macro.items()))
        missing = ",".join(map(str, summary["missing"]))
        print(f"\n{len(summary['finished'])} of {args.cv} folds finished in {args.out}; folds {missing} still to run "
              f"(the same command with --resume --folds {missing}, or --resume alone for all): the cross-validated "
              "results are written once every fold is finished")
        return 0
    print("\n".join(cv_headline(summary)))
    print(f"\nrun folder: {args.out}  (report.md, metrics.json, per_class.csv, folds.csv, roc_curves.png, "
          "predictions_oof_*.csv, fold-*/)")
    return 0


def _train_or_cv(args: argparse.Namespace) -> int:
    if getattr(args, "folds", None) is not None and not getattr(args, "cv", None):
        raise ValueError("--folds needs --cv K: it picks folds of a K-fold cross-validation")
    return cmd_train_cv(args) if getattr(args, "cv", None) else cmd_train(args)


def add_cv_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cv", type=int, metavar="K", help="patient-level K-fold cross-validation (K >= 2) instead "
                                                       "of one train/val/test split")


def cmd_eval(args: argparse.Namespace) -> int:
    from ..engine.evaluate import evaluate_on
    from ..engine.stats import DEFAULT_N_BOOT
    from ..methods.inference import resolve_workers

    res = evaluate_on(args.run, args.data, format=args.format, split=args.split, split_file=args.split_file,
                      approximate=args.approximate, label_space=args.label_space, device=args.device or "auto",
                      cache_dir=args.cache_dir, workers=resolve_workers(args.workers),
                      progress=not (args.json or args.quiet), unit=args.unit,
                      n_boot=DEFAULT_N_BOOT if args.n_boot is None else args.n_boot)
    if args.json:
        print(json.dumps(res, default=float))
        return 0
    m = res["macro"]
    print(f"{res['method']} on {res['dataset']} ({res['split']}, n={res['n']}, {res['classes']} classes; "
          f"skipped: {res['skipped']})")
    if res.get("alignment"):
        print("label alignment: " + ", ".join(f"{t}<-{'+'.join(s) or 'none'}"
                                              for t, s in res["alignment"]["sources"].items()))
    from ..engine.stats import fmt_ci

    ci = res.get("ci", {})
    mc = ci.get("macro", {})
    print(f"macro AUROC {fmt_ci(m['auroc'], mc.get('auroc'))}  F1/ACC at oracle threshold "
          f"{fmt_ci(m['f1_oracle'], mc.get('f1_oracle'))} / {fmt_ci(m['acc_oracle'], mc.get('acc_oracle'))}"
          + (f"  at validation threshold {fmt_ci(m['f1'], mc.get('f1'))} / {fmt_ci(m['acc'], mc.get('acc'))}"
             if "f1" in m else ""))
    for lab, r in res["per_class"].items():
        print(f"  {lab:28s} AUROC {fmt_ci(r['auroc'], ci.get('per_class', {}).get(lab, {}).get('auroc')):20s}  "
              f"positives {r['positives']}/{r['n']}")
    if ci.get("n_boot"):
        print(f"95% intervals: patient bootstrap, {ci['n_boot']} resamples of {ci['patients']} patients, seed "
              f"{ci['seed']} (--n-boot N to change, 0 for none)")
    return 0


def check_predict_out(out: str, inputs: list[Path], overwrite: bool) -> Path:
    """``--out`` must be a new .csv/.json file that is none of the inputs (an X-ray is never overwritten)."""
    path = Path(out)
    if path.suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"--out {out}: must end in .csv or .json (got {path.suffix or 'no suffix'!r})")
    if path.is_dir():
        raise ValueError(f"--out {out} is a folder: give a file name ending in .csv or .json")
    if path.exists():
        target = path.resolve()
        if any(target == Path(i).resolve() for i in inputs):
            raise ValueError(f"--out {out} is one of the input images: refusing to overwrite it")
        if not overwrite:
            raise FileExistsError(f"--out {out} exists: choose another file or pass --overwrite to replace it")
    return path


def check_explain_dir(folder: Path, inputs: list[str]) -> None:
    """``--explain DIR`` may not be an input folder or inside one (its overlays would be scored as images later)."""
    target = folder.resolve()
    for item in map(Path, inputs):
        if item.is_dir() and (target == item.resolve() or item.resolve() in target.parents):
            raise ValueError(f"--explain {folder}: inside the input folder {item}; its heat-map overlays would be "
                             "read as images by the next predict of that folder: choose a folder outside the inputs")


def cmd_predict(args: argparse.Namespace) -> int:
    from ..engine.evaluate import collect_images, predict_images, run_thresholds
    from ..io import atomic_write_bytes
    from ..methods.registry import load_method, model_run_folder

    images = collect_images(args.inputs)
    out = check_predict_out(args.out, images, args.overwrite) if args.out else None
    if args.explain:
        check_explain_dir(Path(args.explain), args.inputs)
    run = model_run_folder(args.run)  # a cross-validation folder predicts with its first fold's model
    method = load_method(run)
    thresholds = run_thresholds(run, method.name)
    from ..engine.calibration import apply_calibration, load_calibrator
    from ..engine.run import resolve_device
    from ..methods.registry import method_folder

    calibrator = load_calibrator(method_folder(run), method.labels)
    if args.case:  # all inputs are the images of ONE case (a patient's eyes, a study's views)
        if args.explain:
            raise ValueError("--explain works per image: leave out --case to get each image's heat maps")
        probs = apply_calibration(calibrator, method.predict_case(images)[None].astype("float64"), method.labels)[0]
        rows = [{"image": " + ".join(str(p) for p in images), "case": True,
                 "probabilities": {lab: float(probs[c]) for c, lab in enumerate(method.labels)}}]
        rows[0]["labels"] = [lab for lab, p in rows[0]["probabilities"].items() if p >= thresholds.get(lab, 0.5)]
    else:
        rows = predict_images(method, images, thresholds, args.batch_size, args.skip_unreadable,
                              device=resolve_device(args.device or "auto", "--device"), workers=args.workers,
                              amp=not args.no_amp, progress=not args.quiet, calibrator=calibrator)
    if args.explain:  # per-label heat-map overlays (medbridge serve's explanations) as PNGs
        from ..serve.explain import write_explanations

        written = write_explanations(method, rows, Path(args.explain), overwrite=args.overwrite)
        print(f"{len(written)} heat-map overlays written to {args.explain}", file=sys.stderr)
    if out is not None and out.suffix.lower() == ".csv":
        import pandas as pd

        frame = pd.DataFrame([{"image": r["image"], **{f"p_{k}": v for k, v in r.get("probabilities", {}).items()},
                               "labels": "|".join(r.get("labels", [])), "error": r.get("error", ""),
                               **({"gate": json.dumps(r["gate"]), "views": json.dumps(r["views"])}
                                  if "gate" in r else {})} for r in rows])
        atomic_write_bytes(out, frame.to_csv(index=False).encode())
    elif out is not None:
        atomic_write_bytes(out, json.dumps(rows, indent=1).encode())
    n_errors = sum("error" in r for r in rows)
    if args.json or out is None:
        print(json.dumps(rows if args.json else [{k: r[k] for k in ("image", "labels", "error") if k in r}
                                                 for r in rows], indent=None if args.json else 1))
    else:
        print(f"{len(rows) - n_errors} predictions written to {out}" + (f" ({n_errors} unreadable image(s) "
              "skipped, listed with their error)" if n_errors else "") + " (thresholds: "
              f"{'validation split of the run' if thresholds else '0.5'})")
    if n_errors and out is not None and not args.json:
        print(f"skipped {n_errors} unreadable image(s): see the 'error' column/field of {out}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..data.datasets.nih import ENTRY_FILES
    from ..engine.config import load_config
    from ..engine.cv import cv_headline, run_cv

    data = Path(args.data or SHARED_SAMPLE)
    if not any((data / f).is_file() for f in ENTRY_FILES):
        where = f"no NIH ChestX-ray14 data at {data}" if args.data else "no --data given and no NIH sample here"
        print(f"medbridge demo: {where}; the demo needs an NIH ChestX-ray14 folder ({ENTRY_FILES[1]} and images/, "
              f"from {NIH_DOWNLOAD}; a few hundred images are enough): medbridge demo --data FOLDER", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    overrides = [f"data.path={data}", f"train.seed={args.seed}", f"data.split_seed={args.seed}",
                 f"train.epochs={args.epochs}"] + config_overrides(args)
    cfg = load_config("demo", None, overrides)
    size = cfg.train.ensemble_for(cfg.method)
    method = cfg.method + (f" (seed ensemble of {size})" if size > 1 else "")
    print(f"medbridge demo: {' vs '.join([method, *cfg.companions])} on {data} with {cfg.backbones[0]}, "
          f"{args.cv}-fold "
          f"patient cross-validation (seed {args.seed}) -> {out}", flush=True)
    t0 = time.perf_counter()
    try:
        with removed_on_failure(out):
            summary = run_cv(cfg, args.cv, out, overwrite=args.overwrite, resume=args.resume,
                             progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished folds are kept; continue with: medbridge demo --out {out} --resume",
              file=sys.stderr)
        return 130
    print(f"\nfinished in {time.perf_counter() - t0:.0f} s\n")
    print("\n".join(cv_headline(summary)))
    print(f"\nrun folder: {out}  (report.md with per-class and per-fold tables, roc_curves.png, metrics.json; "
          "fold-<f>/ are run folders usable by eval/predict)")
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    from ..engine.report import collect_runs, paper_table
    from ..engine.stats import DEFAULT_N_BOOT

    frame = collect_runs([Path(f) for f in args.runs])
    if args.csv:
        frame.to_csv(args.csv, index=False)
    print(paper_table(frame))
    if args.paired:
        from ..engine.benchmark import paired_rows

        print("\n" + paired_rows(frame, DEFAULT_N_BOOT if args.n_boot is None else args.n_boot))
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from ..engine.benchmark import run_benchmark

    args.method = None
    cfg = build_run_config(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from ..methods.registry import get_method

    for m in methods:
        get_method(m)  # unknown names: an error with close matches
    seeds = [int(s) for s in args.seeds.split(",")]
    res = run_benchmark(cfg, methods, seeds, args.out, progress=not args.quiet,
                        command="medbridge " + " ".join(sys.argv[1:]), cv=args.cv)
    print(res["table"])
    if res.get("paired"):
        print("\n" + res["paired"])
    for m, why in res["not_applicable"].items():
        print(f"n/a {m}: {why}")
    print(f"\nwritten: {res['results']} (+ results.csv, results.png, one run folder per method and seed)")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from ..engine.ablation import run_ablations, summarise

    frame = run_ablations(args.study, args.data, args.out, only=args.only.split(",") if args.only else None,
                          seeds=[int(s) for s in args.seeds.split(",")] if args.seeds else None,
                          extra=config_overrides(args), progress=not args.quiet, train=not args.no_train)
    text = summarise(frame, Path(args.out))
    from ..io import atomic_write_bytes

    atomic_write_bytes(Path(args.out, "ablations.md"), (text + "\n").encode())
    print(text)
    return 0


def add_run_commands(sub, presets: list[str]) -> None:
    p = sub.add_parser("train", help="train an adapter (MedBridge or a linear probe) on a dataset",
                       description="Train on the training split, pick thresholds on validation, evaluate on test, "
                                   "and write a run folder (adapter, metrics, predictions, ROC curves, report).",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=TRAIN_EXAMPLES.format(presets=", ".join(presets)))
    add_common_data(p)
    p.add_argument("--out", required=True, help="run folder (must be new or empty unless --resume/--overwrite)")
    add_config_args(p, presets)
    p.add_argument("--method", metavar="METHOD",  # checked with the config (close-match hints), after plugins
                   help="a registered method (medbridge list methods; default: the preset's, else medbridge)")
    p.add_argument("--split-file", help="reuse a split.json from another run")
    p.add_argument("--also", metavar="METHODS", help="comma-separated methods fitted beside --method on the same "
                                                     "split (and frozen features when they can read them)")
    p.add_argument("--with-probe", action="store_true",
                   help="also fit the registered probe (the linear probe) beside --method")
    add_cv_arg(p)
    p.add_argument("--folds", metavar="F,F",
                   help="with --cv K: train only these folds (0..K-1, as the fold-<f>/ folders; the same patient "
                        "folds), e.g. one fold per machine; --resume adds the others to the folder, the CV "
                        "results come once all K are finished")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    add_shared_options(p, device=True, config=True, n_boot=True)
    p.set_defaults(func=_train_or_cv)

    p = sub.add_parser("eval", help="metrics of a trained adapter/probe on a dataset (also another dataset)",
                       description="Evaluate a run folder (or adapter/probe folder) on a dataset. On the dataset it "
                                   "was trained on, the run's test split is used; on another dataset, all its "
                                   "images (cross-dataset zero-shot), with labels aligned by name.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  medbridge eval runs/nih --data /data/nih --json\n"
                              "  medbridge eval runs/mimic --data /data/chexpert-plus --format chexpert-plus\n"
                              "  medbridge eval runs/mimic --data /data/nih --approximate --label-space model")
    p.add_argument("run", help="run folder, adapter folder or linear-probe folder")
    add_common_data(p)
    p.add_argument("--split", choices=["test", "val", "train", "all"], help="which images (default: see above)")
    p.add_argument("--split-file", help="a split.json to take the split from")
    p.add_argument("--unit", choices=["auto", "image", "case"],
                   help="score images or cases of several images (default: the run's data.unit)")
    p.add_argument("--approximate", action="store_true",
                   help="also map approximate label counterparts (Nodule/Mass->Lung Lesion, ...)")
    p.add_argument("--label-space", choices=["model", "data"], default="model",
                   help="score the model's labels (default) or the dataset's own label names via prompts")
    p.add_argument("--cache-dir", help="frozen-activation cache folder")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (no progress bars)")
    add_shared_options(p, device=True, n_boot=True)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="probabilities and labels for images (PNG/JPEG/DICOM, files or folders)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  medbridge predict runs/demo-x image.dcm folder/ --out predictions.csv\n"
                              "  medbridge predict runs/demo-x/linear_probe image.png --json\n"
                              "  medbridge predict runs/odir 0_left.jpg 0_right.jpg --case   (one patient)")
    p.add_argument("run", help="run folder, adapter folder or linear-probe folder")
    p.add_argument("inputs", nargs="+", help="image files and/or folders")
    p.add_argument("--out", help="write a new .csv or .json file (atomic; never one of the inputs)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--json", action="store_true", help="print full JSON (probabilities, gate, per-view votes)")
    p.add_argument("--batch-size", type=int, default=16, help="images per model call (default: %(default)s)")
    p.add_argument("--no-amp", action="store_true", help="fp32 on CUDA instead of bf16 autocast")
    p.add_argument("--skip-unreadable", action="store_true", help="report unreadable images instead of failing")
    p.add_argument("--case", action="store_true", help="the inputs are the images of ONE case (e.g. a patient's "
                                                       "left and right fundus photographs, a study's PA and "
                                                       "lateral): one prediction for them together")
    p.add_argument("--explain", metavar="DIR", help="also write heat-map overlays (PNG) of each image's positive "
                                                    "and 3 most probable labels into DIR (methods with "
                                                    "explanations: medbridge list methods --json)")
    add_shared_options(p, device=True)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("collect", help="collect run folders' metrics into a paper-style table",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  medbridge collect runs/nih-s0 runs/nih-s1 runs/nih-s2 --csv results.csv")
    p.add_argument("runs", nargs="+", help="run folders (with metrics.json)")
    p.add_argument("--csv", help="also write one row per (run, method) as CSV")
    p.add_argument("--paired", action="store_true",
                   help="paired macro AUROC difference of every (run, method) to the first, on the same test images "
                        "(runs with the same split, or --cv runs with the same folds), with interval and p-value")
    add_shared_options(p, n_boot=True)
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("benchmark", help="compare methods on the same data, split, seeds and backbone",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  medbridge benchmark --data ../shared/data/nih-cxr14-sample --methods "
                              "medbridge,linear-probe,zero-shot --seeds 0,1,2 --out runs/bench\n"
                              "  medbridge benchmark --preset cross-domain --data /data/nih --methods "
                              "medbridge,linear-probe,zero-shot,coop,cocoop,kgcoop,prograd,clip-adapter,lp-text "
                              "--out runs/nih-table1")
    add_common_data(p)
    p.add_argument("--methods", default="medbridge,linear-probe", help="comma-separated methods")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (split + initialisation)")
    p.add_argument("--out", required=True, help="benchmark folder (finished runs inside are reused)")
    add_config_args(p, presets)
    add_cv_arg(p)
    add_shared_options(p, device=True, config=True, n_boot=True)
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("ablate", help="run an ablation study (settings x seeds) and tabulate/plot it",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  medbridge ablate --data ../shared/data/nih-cxr14-sample --out runs/abl\n"
                              "  medbridge ablate --study my_study.yaml --data /data/nih --only t1,alpha "
                              "--seeds 0,1,2 --out runs/abl-nih --set 'backbones=[\"clip-vit-b-16\"]'")
    p.add_argument("--study", default="ablations", help="a study YAML or a shipped study (default: ablations; shipped: "
                   f"{', '.join(list_studies())})")
    p.add_argument("--data", default=SHARED_SAMPLE)
    p.add_argument("--out", required=True, help="study folder (finished runs are reused)")
    p.add_argument("--only", help="comma-separated study names to run")
    p.add_argument("--no-train", action="store_true", help="only summarise the runs that have finished")
    p.add_argument("--seeds", help="comma-separated seeds (default: the study's)")
    add_shared_options(p, device=True, config=True, n_boot=True)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("demo", help="THE main job: MedBridge vs linear probe on the real NIH sample",
                       description="5-fold patient cross-validation of MedBridge and a linear probe on the same "
                                   "frozen features of the NIH sample with the bundled backbone (one cache build "
                                   "for all folds); prints the mean-over-folds macro AUROC of each with its 95% "
                                   "patient-bootstrap interval and the paired difference with interval and p-value; "
                                   "writes a run folder (fold-<f>/ usable by eval/predict).",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  medbridge demo\n  medbridge demo --data /data/nih --seed 1 --out runs/d1")
    p.add_argument("--data", help=f"NIH-layout folder (default: {SHARED_SAMPLE}, the sample beside a checkout)")
    p.add_argument("--out", help="run folder (default: runs/demo-<time>)")
    p.add_argument("--seed", type=int, default=0, help="split and training seed")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--cv", type=int, default=5, metavar="K", help="patient folds (default: %(default)s)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    add_shared_options(p, device=True, config=True, n_boot=True)
    p.set_defaults(func=cmd_demo)
