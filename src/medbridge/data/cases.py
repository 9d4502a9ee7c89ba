"""Cases made of several images: an ODIR patient (both eyes), a MIMIC-CXR / CheXpert study (PA + lateral).

A :class:`CaseTable` is the unit the engine trains, splits, scores and reports on when ``data.unit: case``: one
row per case, its labels, its patient, and the image rows of the underlying :class:`ImageTable` it is made of
(``members``, [C, K] padded with -1). The frozen-activation cache stays per image (shared with per-image runs);
``engine/cases.py`` reads a case from it. Images are grouped by the table's ``case_id`` column."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from .table import DatasetError, ImageTable, label_count_frame

UNITS = ("auto", "image", "case")
#: what a method that scores images one by one is trained on under ``data.unit: case``: each image with its case's
#: labels, or with its own (ODIR-5K: the eye's labels from its diagnostic keywords; MIMIC: the study's anyway)
IMAGE_LABELS = ("case", "own")
CASE_PATH_SEPARATOR = " + "


@dataclass(frozen=True)
class CaseTable:
    """Cases of ``images``: ``meta`` one row per case (``case_id``, ``patient_id``, ``split``, ``n_images``, and the
    first image's other metadata), ``targets`` [C, L] (NaN = unknown), ``members`` [C, K] image rows (-1 = none);
    ``image_labels``: what :meth:`image_targets` gives (:data:`IMAGE_LABELS`)."""

    images: ImageTable
    meta: pd.DataFrame
    targets: np.ndarray
    members: np.ndarray
    image_labels: str = "case"

    # the parts of the ImageTable interface the engine uses, per case
    name = property(lambda self: self.images.name)
    root = property(lambda self: self.images.root)
    labels = property(lambda self: self.images.labels)
    prompt_names = property(lambda self: self.images.prompt_names)
    citation = property(lambda self: self.images.citation)
    notes = property(lambda self: self.images.notes)
    unit = "case"

    def __len__(self) -> int:
        return len(self.meta)

    def __repr__(self) -> str:
        return (f"CaseTable({self.name!r}, {len(self)} cases of {int((self.members >= 0).sum())} images, "
                f"{self.meta['patient_id'].nunique()} patients, {len(self.labels)} labels)")

    @property
    def paths(self) -> list[Path]:
        """The image files (of every case), for checks that look at images (sizes, readability)."""
        return self.images.paths

    @property
    def patient_ids(self) -> np.ndarray:
        return self.meta["patient_id"].to_numpy()

    @property
    def reports(self) -> list[str | None]:
        texts = self.images.reports
        out = []
        for row in self.members:
            parts = list(dict.fromkeys(texts[i] for i in row if i >= 0 and texts[i]))
            out.append("\n".join(parts) if parts else None)
        return out

    def relative_paths(self) -> list[str]:
        """One key per case: its images' relative paths joined by `` + `` (split files and predictions)."""
        rel = self.images.relative_paths()
        return [CASE_PATH_SEPARATOR.join(rel[i] for i in row if i >= 0) for row in self.members]

    def image_rows(self, rows: np.ndarray) -> np.ndarray:
        """The image rows of cases ``rows`` (flattened, -1 slots dropped)."""
        m = self.members[np.asarray(rows, dtype=int)]
        return m[m >= 0]

    def image_targets(self) -> np.ndarray:
        """What a method that scores images one by one is trained on under ``data.unit: case``: every image's
        targets replaced by those of its case (``image_labels: case``), or its own (``own``); images of no case:
        NaN."""
        out = np.full(self.images.targets.shape, np.nan, dtype=np.float32)
        for c, row in enumerate(self.members):
            out[row[row >= 0]] = self.images.targets[row[row >= 0]] if self.image_labels == "own" else self.targets[c]
        return out

    def subset(self, indices, what: str = "subset") -> CaseTable:
        idx = np.asarray(indices)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        if len(idx) == 0:
            raise DatasetError(f"{self.name}: no cases left after {what}")
        return replace(self, meta=self.meta.iloc[idx].reset_index(drop=True), targets=self.targets[idx].copy(),
                       members=self.members[idx].copy())

    def align(self, labels, approximate: bool = False, prompt_names=None):
        images, alignment = self.images.align(labels, approximate, prompt_names)
        return to_cases(images, self.image_labels), alignment

    def label_counts(self) -> pd.DataFrame:
        return label_count_frame(self.labels, self.targets)


def mean_logit(probabilities: np.ndarray) -> np.ndarray:
    """The case rule of methods that score images one by one: sigmoid(mean(logit(p))) over axis 0 (probabilities
    clipped to [1e-6, 1 - 1e-6])."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-6, 1 - 1e-6)
    z = np.log(p) - np.log1p(-p)
    return (1 / (1 + np.exp(-z.mean(axis=0)))).astype(np.float32)


def has_cases(table: ImageTable) -> bool:
    return "case_id" in table.meta.columns and table.meta["case_id"].notna().any()


def resolve_unit(unit: str, table: ImageTable) -> str:
    """``auto``: the dataset's own default (``notes["default_unit"]``: ODIR -> case), else image."""
    if unit not in UNITS:
        raise DatasetError(f"data.unit must be one of {UNITS}, got {unit!r}")
    if unit == "auto":
        return table.notes.get("default_unit", "image") if has_cases(table) else "image"
    return unit


def to_cases(table: ImageTable, image_labels: str = "case") -> CaseTable:
    """Group the rows of ``table`` into cases by its ``case_id`` column (order of first appearance; images keep
    the table's order inside a case). A case's labels are the table's ``case_targets`` when the dataset gives
    them, else the maximum over its images (positive if any image is; NaN only where every image is unknown);
    images whose labels disagree inside a case are fine (MIMIC's labels are per study anyway). ``image_labels``:
    see :data:`IMAGE_LABELS`."""
    if image_labels not in IMAGE_LABELS:
        raise DatasetError(f"data.case_image_labels must be one of {IMAGE_LABELS}, got {image_labels!r}")
    if not has_cases(table):
        raise DatasetError(f"{table.name}: data.unit=case needs images grouped into cases (a 'case_id' column: "
                           "a patient's eyes in ODIR-5K, a study in MIMIC-CXR / CheXpert); this dataset has none")
    ids = table.meta["case_id"].map(lambda v: None if v is None or (isinstance(v, float) and np.isnan(v))
                                    else str(v)).to_numpy(dtype=object)
    if any(v is None for v in ids):
        i = int(np.flatnonzero([v is None for v in ids])[0])
        raise DatasetError(f"{table.name}: image {table.meta['path'].iloc[i]} belongs to no case (empty case_id)")
    codes, uniques = pd.factorize(pd.Series(ids), sort=False)
    order = np.argsort(codes, kind="stable")
    counts = np.bincount(codes, minlength=len(uniques))
    k = int(counts.max())
    members = np.full((len(uniques), k), -1, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(len(order)) - np.repeat(starts, counts)
    members[codes[order], slot] = order
    first = members[:, 0]
    patients = table.patient_ids
    mixed = [c for c in range(len(uniques)) if len(set(patients[members[c][members[c] >= 0]])) > 1]
    if mixed:
        c = mixed[0]
        raise DatasetError(f"{table.name}: case {uniques[c]!r} holds images of several patients "
                           f"{sorted(set(patients[members[c][members[c] >= 0]]))}; a case belongs to one patient")
    if table.case_targets is not None:
        where = {cid: i for i, cid in enumerate(table.case_targets[0])}
        missing = [u for u in uniques if u not in where]
        if missing:
            raise DatasetError(f"{table.name}: case {missing[0]!r} has images but no case labels")
        targets = table.case_targets[1][[where[u] for u in uniques]]
    else:
        t = table.targets[np.where(members >= 0, members, first[:, None])]  # [C, K, L]
        targets = np.where(np.isnan(t).all(axis=1), np.nan, np.nanmax(np.nan_to_num(t, nan=-np.inf), axis=1))
    meta = table.meta.iloc[first].reset_index(drop=True).drop(columns=["path", "case_id"])
    meta.insert(0, "case_id", list(uniques))
    meta["n_images"] = counts
    return CaseTable(table, meta, np.asarray(targets, dtype=np.float32), members, image_labels)


def case_or_image_table(table: ImageTable, unit: str, image_labels: str = "case") -> ImageTable | CaseTable:
    """``table`` itself, or its cases, by ``data.unit`` (``image_labels``: see :data:`IMAGE_LABELS`)."""
    return to_cases(table, image_labels) if resolve_unit(unit, table) == "case" else table
