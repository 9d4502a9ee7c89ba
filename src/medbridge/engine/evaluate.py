"""Evaluating and applying trained methods on any dataset or image list (cross-dataset with label alignment)."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import numpy as np

from ..data import load_dataset, load_split, make_split
from ..data.cases import case_or_image_table
from ..data.datasets.generic import describe_broken_links, image_files
from ..data.images import IMAGE_SUFFIXES
from ..data.table import DatasetError, shorten
from ..methods.api import Method, TextPrompted, require
from ..methods.registry import load_method, method_folder, model_run_folder
from .calibration import apply_calibration, load_calibrator
from .features import cache_root_from
from .metrics import evaluate_scores
from .run import method_scores, resolve_device
from .stats import DEFAULT_N_BOOT, bootstrap_metrics

log = logging.getLogger(__name__)


def run_thresholds(folder: Path, method: str) -> dict | None:
    """Validation thresholds stored with a run (``metrics.json``), if the folder is a run folder."""
    for cand in (folder, folder.parent):
        f = cand / "metrics.json"
        if f.is_file():
            res = json.loads(f.read_text()).get("methods", {}).get(method)
            if res and res.get("thresholds"):
                return {k: float(v) for k, v in res["thresholds"].items()}
    return None


def evaluate_on(method_dir: str | Path, data: str | Path, *, format: str = "auto", split: str | None = None,
                split_file: str | None = None, options: dict | None = None, approximate: bool = False,
                label_space: str = "model", device: str = "auto", cache_dir: str | None = None,
                workers: int = 2, progress: bool = True, unit: str | None = None,
                n_boot: int = DEFAULT_N_BOOT) -> dict:
    """Metrics of a trained method on a dataset (per image or per case: ``unit``, default the run's
    ``data.unit``). ``split``: test/val/train/all (default: the run's own test
    split when ``data`` is the dataset it was trained on, else all images: cross-dataset zero-shot).
    ``label_space``: "model" (the method's labels; the dataset is aligned onto them, NaN where it has no
    counterpart) or "data" (text-prompted methods only: the dataset's own label names become prompts). Intervals:
    ``n_boot`` patient-bootstrap resamples (0: none)."""
    folder = model_run_folder(method_dir)  # a cross-validation folder: its first fold's model and split
    method = load_method(folder)
    table = load_dataset(format, data, **(options or {}))
    # a method folder inside a run folder (RUN/linear_probe, RUN/coop) belongs to the run's config and split
    run_dir = next((c for c in (folder, folder.parent) if (c / "config.yaml").is_file()), folder)
    run_cfg = run_dir / "config.yaml"
    same, run_unit = False, "auto"
    if run_cfg.is_file():
        import yaml

        run_data = (yaml.safe_load(run_cfg.read_text()) or {}).get("data", {})
        trained_on, run_unit = run_data.get("path"), run_data.get("unit", "auto")
        same = bool(trained_on) and Path(trained_on).resolve() == Path(data).resolve()
    table = case_or_image_table(table, unit or run_unit)
    split = split or ("test" if same else "all")
    if split_file or (same and split != "all" and (run_dir / "split.json").is_file()):
        parts = load_split(split_file or run_dir / "split.json", table)
    elif split != "all":
        parts = make_split(table)
    rows = np.arange(len(table)) if split == "all" else getattr(parts, split)
    if len(rows) == 0:
        raise DatasetError(f"{table.name}: the {split!r} split is empty")
    alignment = None
    if label_space == "data":
        require(method, TextPrompted, "scoring other label names (--label-space data needs a text-prompted method)")
        method = method.with_label_names(list(table.labels), list(table.prompt_names))
    elif label_space == "model":
        if list(table.labels) != method.labels:
            table, alignment = table.align(method.labels, approximate=approximate)
            log.info("label alignment: %s", alignment.summary())
    else:
        raise ValueError(f"label_space must be 'model' or 'data', got {label_space!r}")
    dev = resolve_device(device, "--device")
    rows, scores = method_scores(method, table, rows, cache_root_from(cache_dir), dev, workers, progress=progress)
    thresholds = run_thresholds(folder, method.name) if label_space == "model" else None
    calibrator = load_calibrator(method_folder(folder), method.labels) if label_space == "model" else None
    scores = apply_calibration(calibrator, scores, method.labels)  # the run's thresholds are on this scale
    res = evaluate_scores(scores, table.targets[rows], method.labels, thresholds)
    res["ci"] = bootstrap_metrics(scores, table.targets[rows], method.labels, table.patient_ids[rows], thresholds,
                                  n_boot)
    res.update({"method": method.name, "dataset": table.name, "data": str(data), "split": split,
                "calibration": calibrator["kind"] if calibrator else "none",
                "threshold_source": "validation split of the training run" if thresholds else "none (oracle only)",
                "alignment": alignment.to_dict() if alignment else None})
    return res


def collect_images(inputs: list[str | Path]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        try:
            os.stat(p)
        except OSError as exc:  # ENAMETOOLONG and friends: one short line, not the whole name twice
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise FileNotFoundError(f"input {shorten(p)}: cannot be looked up ({exc.strerror})") from None
        if p.is_dir():
            found, broken = image_files(p)
            files += found
            if broken:
                log.warning("%s: %s", p, describe_broken_links(broken))
        elif p.is_file():
            files.append(p)
        elif p.is_symlink():
            raise FileNotFoundError(f"input {p} is a broken symbolic link (target {os.readlink(p)} missing)")
        else:
            raise FileNotFoundError(f"input {shorten(p)} does not exist")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {list(map(str, inputs))}")
    return files


def predict_images(method: Method, images: list[Path], thresholds: dict | None = None,
                   batch_size: int = 8, skip_unreadable: bool = False, *, device: str = "cpu",
                   workers: int | None = None, amp: bool = True, progress: bool = False,
                   calibrator: dict | None = None) -> list[dict]:
    """Per image: probabilities (calibrated with the run's ``calibrator``, if any), thresholded labels and
    (MedBridge) gate weights and per-view votes/boxes; batched on ``device`` with decoding in ``workers`` processes
    (:func:`~medbridge.methods.inference.iter_scored`; images beyond serve's bounds on the work per image are
    refused there)."""
    from ..methods.inference import iter_scored

    rows = []
    thresholds = thresholds or {}
    for s in iter_scored(method, images, batch_size=batch_size, device=device, workers=workers, amp=amp,
                         skip_unreadable=skip_unreadable, progress=progress):
        if s.error is not None:
            rows.append({"image": str(images[s.index]), "error": s.error})
            continue
        probs = apply_calibration(calibrator, np.asarray(s.scores, dtype=np.float64)[None], method.labels)[0]
        row = {"image": str(images[s.index]),
               "probabilities": {lab: float(probs[c]) for c, lab in enumerate(method.labels)}}
        row["labels"] = [lab for lab, p in row["probabilities"].items() if p >= thresholds.get(lab, 0.5)]
        if s.details:
            row["gate"] = np.asarray(s.details["gate"]).round(4).tolist()
            row["views"] = [{"box": s.boxes[v].tolist(), "vote": float(np.mean(s.details["view_votes"][:, v]))}
                            for v in range(s.boxes.shape[0])]
        rows.append(row)
    return rows
