"""The dataset object every loader returns: an immutable table of images, labels and metadata."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from .labels import Alignment, align_label_names, align_targets, prompt_name

FRONTAL_VIEWS = ("PA", "AP", "FRONTAL")  # FRONTAL: frontal with AP/PA not recorded
LATERAL_VIEWS = ("LATERAL", "LL", "RL")
SPLIT_NAMES = ("train", "val", "test")


class DatasetError(ValueError):
    """A dataset on disk does not have the expected form; the message names the file/row/column."""


@dataclass(frozen=True)
class ImageTable:
    """Images of one dataset with their labels.

    ``meta`` has one row per image with columns ``path`` (absolute), ``patient_id`` (str), ``view`` (PA/AP/
    LATERAL/... or None), ``split`` (official split train/val/test or None), ``report`` (text or None), plus
    dataset-specific columns. ``targets`` is float32 [N, L], NaN = unknown. Methods return new tables; nothing is
    modified in place and nothing is ever written to the dataset folder."""

    name: str
    root: Path
    labels: tuple[str, ...]
    meta: pd.DataFrame
    targets: np.ndarray
    prompt_names: tuple[str, ...] = ()
    citation: str = ""
    notes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.targets.shape != (len(self.meta), len(self.labels)):
            raise DatasetError(f"{self.name}: targets {self.targets.shape} do not match "
                               f"{len(self.meta)} images x {len(self.labels)} labels")
        if not self.prompt_names:
            object.__setattr__(self, "prompt_names", tuple(prompt_name(x) for x in self.labels))
        for col in ("path", "patient_id", "view", "split", "report"):
            if col not in self.meta.columns:
                raise DatasetError(f"{self.name}: metadata lacks column {col!r}")

    def __len__(self) -> int:
        return len(self.meta)

    def __repr__(self) -> str:
        return (f"ImageTable({self.name!r}, {len(self)} images, {self.meta['patient_id'].nunique()} patients, "
                f"{len(self.labels)} labels)")

    @property
    def paths(self) -> list[Path]:
        return [Path(p) for p in self.meta["path"]]

    @property
    def patient_ids(self) -> np.ndarray:
        return self.meta["patient_id"].to_numpy()

    @property
    def reports(self) -> list[str | None]:
        return [r if isinstance(r, str) and r else None for r in self.meta["report"]]

    def relative_paths(self) -> list[str]:
        return [Path(p).relative_to(self.root).as_posix() if Path(p).is_relative_to(self.root) else str(p)
                for p in self.meta["path"]]

    def subset(self, indices, what: str = "subset") -> ImageTable:
        """Rows ``indices`` (ints or a boolean mask) as a new table; an empty result is an error naming ``what``."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        if len(idx) == 0:
            raise DatasetError(f"{self.name}: no images left after {what}")
        return replace(self, meta=self.meta.iloc[idx].reset_index(drop=True), targets=self.targets[idx].copy())

    def filter_views(self, views: str | list[str] | tuple[str, ...]) -> ImageTable:
        """Keep views: "frontal" (PA+AP), "lateral", or a list like ["PA"]. Images with unknown view are dropped."""
        if isinstance(views, str):
            wanted = {"frontal": FRONTAL_VIEWS, "lateral": LATERAL_VIEWS}.get(views.lower(), (views,))
        else:
            wanted = tuple(views)
        wanted = {v.upper() for v in wanted}
        keep = self.meta["view"].map(lambda v: isinstance(v, str) and v.upper() in wanted).to_numpy()
        return self.subset(keep, f"keeping views {sorted(wanted)} (views present: "
                                 f"{sorted(self.meta['view'].dropna().unique().tolist())})")

    def official(self, split: str) -> ImageTable:
        if split not in SPLIT_NAMES:
            raise DatasetError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
        if self.meta["split"].isna().all():
            raise DatasetError(f"{self.name}: this dataset copy has no official split")
        return self.subset((self.meta["split"] == split).to_numpy(), f"selecting the official {split!r} split")

    def align(self, labels: list[str] | tuple[str, ...], approximate: bool = False,
              prompt_names: list[str] | None = None) -> tuple[ImageTable, Alignment]:
        """This table with targets re-indexed onto ``labels`` (NaN where it has no counterpart) and the report."""
        alignment = align_label_names(self.labels, labels, approximate)
        targets = align_targets(self.targets, self.labels, alignment)
        names = tuple(prompt_names) if prompt_names else tuple(prompt_name(x) for x in labels)
        return replace(self, labels=tuple(labels), targets=targets, prompt_names=names), alignment

    def label_counts(self) -> pd.DataFrame:
        t = self.targets
        return pd.DataFrame({"label": self.labels, "positive": np.nansum(t == 1, axis=0).astype(int),
                             "negative": np.nansum(t == 0, axis=0).astype(int),
                             "unknown": np.isnan(t).sum(axis=0).astype(int)})


def build_table(name: str, root: Path, labels, meta: pd.DataFrame, targets: np.ndarray, *, citation: str = "",
                prompt_names=(), notes: dict | None = None, check_files: bool = True,
                source: str = "") -> ImageTable:
    """Fill optional metadata columns, check duplicates / missing files / emptiness, and build the table."""
    meta = meta.reset_index(drop=True).copy()
    meta["path"] = [os.path.abspath(p) for p in meta["path"]]
    root = Path(os.path.abspath(root))
    for col in ("view", "split", "report"):
        if col not in meta.columns:
            meta[col] = None
    meta["patient_id"] = meta["patient_id"].astype(str)
    if len(meta) == 0:
        raise DatasetError(f"{name}: no images listed in {source or root}")
    dup = meta["path"].duplicated(keep=False)
    if dup.any():
        rows = meta.index[dup].tolist()[:6]
        raise DatasetError(f"{name}: {source or root}: image {meta['path'][rows[0]]} is listed more than once "
                           f"(rows {[r + 2 for r in rows]} counting the header as row 1); remove duplicated rows")
    if check_files:
        missing = [p for p in meta["path"] if not Path(p).is_file()]
        if missing:
            raise DatasetError(f"{name}: {len(missing)} image file(s) listed in {source or root} not found, e.g. "
                               f"{missing[0]}" + (f" (and {missing[1]})" if len(missing) > 1 else ""))
    return ImageTable(name, Path(root), tuple(labels), meta, np.asarray(targets, dtype=np.float32),
                      tuple(prompt_names), citation, dict(notes or {}))


def read_csv(path: Path, what: str, **kwargs) -> pd.DataFrame:
    """pandas.read_csv with a clear error for missing/unreadable files (gzip handled by the suffix)."""
    if not path.is_file():
        raise DatasetError(f"{what}: expected file {path} not found")
    try:
        return pd.read_csv(path, **kwargs)
    except Exception as exc:
        raise DatasetError(f"{what}: cannot read {path} as CSV: {exc}") from exc


def require_columns(frame: pd.DataFrame, columns, source: str | Path) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DatasetError(f"{source}: missing required column(s) {missing}; columns present: "
                           f"{list(frame.columns)}")


def parse_label_values(frame: pd.DataFrame, columns, source: str | Path,
                       allowed=(1.0, 0.0, -1.0)) -> np.ndarray:
    """Label columns -> float array (blank = NaN); any other value is an error naming row and column."""
    out = np.empty((len(frame), len(columns)), dtype=np.float32)
    for j, col in enumerate(columns):
        raw = frame[col]
        num = pd.to_numeric(raw, errors="coerce")
        bad = (num.isna() & raw.notna() & (raw.astype(str).str.strip() != "")) | (num.notna() & ~num.isin(allowed))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DatasetError(f"{source}: row {i + 2} column {col!r}: label value {str(raw.iloc[i])!r} is not one of "
                               f"{[int(a) for a in allowed]} or blank")
        out[:, j] = num.to_numpy(dtype=np.float32)
    return out
