"""Patient-level splits, nested label fractions and split files that make runs repeatable and shareable."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import atomic_write_bytes
from .table import SPLIT_NAMES, DatasetError, ImageTable, read_json

SPLIT_FORMAT = "medbridge-split/1"


@dataclass(frozen=True)
class Split:
    """Row indices of train/val/test in one table, with how they were made."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    info: dict

    def tables(self, table: ImageTable) -> dict[str, ImageTable]:
        return {name: table.subset(getattr(self, name), f"the {name} split") for name in SPLIT_NAMES
                if len(getattr(self, name))}


def patient_split(table: ImageTable, fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
                  seed: int = 0) -> Split:
    """Random patient-disjoint train/val/test split: patients are shuffled with ``seed`` and assigned so that the
    image counts come closest to ``fractions``."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise DatasetError(f"split fractions must be three numbers >= 0 summing to 1, got {fractions}")
    patients, inverse, counts = np.unique(table.patient_ids, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(patients))
    cum = np.cumsum(counts[order]) / len(table)
    cut1, cut2 = fractions[0], fractions[0] + fractions[1]
    part = np.where(cum <= cut1 + 1e-9, 0, np.where(cum <= cut2 + 1e-9, 1, 2))
    if fractions[0] > 0 and not (part == 0).any():
        part[0] = 0
    patient_part = np.empty(len(patients), dtype=int)
    patient_part[order] = part
    rows = patient_part[inverse]
    return Split(*(np.flatnonzero(rows == k) for k in range(3)),
                 info={"kind": "patient", "seed": seed, "fractions": list(fractions)})


def official_split(table: ImageTable, val_fraction: float = 0.1, seed: int = 0) -> Split:
    """The dataset's own split; when it defines no validation set, ``val_fraction`` of the training PATIENTS
    become validation (seeded). Patients present in both official train and test are reported as an error."""
    split = table.meta["split"].to_numpy()
    if all(s is None or (isinstance(s, float) and np.isnan(s)) for s in split):
        raise DatasetError(f"{table.name}: no official split in this copy (use a patient split)")
    train = np.flatnonzero(split == "train")
    val = np.flatnonzero(split == "val")
    test = np.flatnonzero(split == "test")
    overlap = set(table.patient_ids[train]) & set(table.patient_ids[test])
    if overlap:
        raise DatasetError(f"{table.name}: official train and test share {len(overlap)} patient(s), e.g. "
                           f"{sorted(overlap)[0]}")
    if len(val) == 0 and val_fraction > 0:
        sub = table.subset(train, "the official train split")
        inner = patient_split(sub, (1 - val_fraction, val_fraction, 0.0), seed)
        train, val = train[inner.train], train[inner.val]
    return Split(train, val, test, info={"kind": "official", "seed": seed, "val_fraction": val_fraction})


def label_fraction(table: ImageTable, indices: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """A seeded subset of ``indices`` holding ~``fraction`` of its images, whole patients at a time. The patient
    order depends only on ``seed``, so a smaller fraction is always a subset of a larger one."""
    if not 0 < fraction <= 1:
        raise DatasetError(f"label fraction must be in (0, 1], got {fraction}")
    indices = np.asarray(indices)
    if fraction == 1:
        return indices.copy()
    pids = table.patient_ids[indices]
    patients = np.unique(pids)
    order = patients[np.random.default_rng([seed, 7919]).permutation(len(patients))]
    counts = {p: 0 for p in patients}
    for p in pids:
        counts[p] += 1
    want = max(1, round(fraction * len(indices)))
    chosen, total = set(), 0
    for p in order:
        if total >= want:
            break
        chosen.add(p)
        total += counts[p]
    return indices[np.isin(pids, list(chosen))]


def make_split(table: ImageTable, *, kind: str = "auto", fractions=(0.7, 0.1, 0.2), seed: int = 0,
               label_frac: float = 1.0) -> Split:
    """Official split when the dataset has one (``kind="auto"``), else a patient split; then the label fraction
    of the training part."""
    has_official = table.meta["split"].notna().any()
    if kind == "auto":
        kind = "official" if has_official else "patient"
    if kind == "official":
        split = official_split(table, fractions[1] / max(fractions[0] + fractions[1], 1e-9), seed)
    elif kind == "patient":
        split = patient_split(table, tuple(fractions), seed)
    else:
        raise DatasetError(f"split kind must be auto, official or patient, got {kind!r}")
    if label_frac < 1:
        split = Split(label_fraction(table, split.train, label_frac, seed), split.val, split.test,
                      {**split.info, "label_fraction": label_frac})
    return split


def save_split(split: Split, table: ImageTable, path: str | Path) -> Path:
    """Write the split as JSON (paths relative to the dataset root), atomically."""
    rel = table.relative_paths()
    doc = {"format": SPLIT_FORMAT, "dataset": table.name, "root": str(table.root), "info": split.info,
           **{name: [rel[i] for i in getattr(split, name)] for name in SPLIT_NAMES}}
    path = Path(path)
    atomic_write_bytes(path, json.dumps(doc, indent=1).encode())
    return path


def load_split(path: str | Path, table: ImageTable) -> Split:
    """Read a split file and map it onto ``table``; images it names that the table lacks are an error."""
    path = Path(path)
    doc = read_json(path, "split file")
    if not isinstance(doc, dict) or doc.get("format") != SPLIT_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise DatasetError(f"split file {path}: format {found!r}, expected {SPLIT_FORMAT!r}")
    where = {p: i for i, p in enumerate(table.relative_paths())}
    parts = []
    for name in SPLIT_NAMES:
        listed = doc.get(name, [])
        if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
            raise DatasetError(f"split file {path}: {name!r} must be a list of image paths (strings)")
        missing = [p for p in listed if p not in where]
        if missing:
            raise DatasetError(f"split file {path}: {len(missing)} {name} image(s) are not in dataset "
                               f"{table.name} at {table.root}, e.g. {missing[0]}")
        parts.append(np.array([where[p] for p in listed], dtype=int))
    every = np.concatenate(parts)
    values, counts = np.unique(every, return_counts=True)
    if (counts > 1).any():
        i = values[counts > 1][0]
        listed_in = [name for name, idx in zip(SPLIT_NAMES, parts) for _ in range(int((idx == i).sum()))]
        raise DatasetError(f"split file {path}: image {table.relative_paths()[i]} is listed more than once "
                           f"(in {listed_in}); each image belongs to one part")
    info = doc.get("info", {})
    return Split(*parts, info=info if isinstance(info, dict) else {})
