"""The dataset object every loader returns: an immutable table of images, labels and metadata."""

from __future__ import annotations

import json
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
    #: labels of whole cases when they are not those of the images (ODIR: the official patient labels), as
    #: (case ids, float32 [C, L]); None: a case's labels are the maximum over its images (see ``data/cases.py``)
    case_targets: tuple[tuple[str, ...], np.ndarray] | None = None

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
        cases = None if self.case_targets is None else (
            self.case_targets[0], align_targets(self.case_targets[1], self.labels, alignment))
        return replace(self, labels=tuple(labels), targets=targets, prompt_names=names, case_targets=cases), alignment

    def label_counts(self) -> pd.DataFrame:
        return label_count_frame(self.labels, self.targets)


def label_count_frame(labels, targets: np.ndarray) -> pd.DataFrame:
    """Positives, negatives and unknowns per label of a targets array (NaN = unknown)."""
    return pd.DataFrame({"label": list(labels), "positive": np.nansum(targets == 1, axis=0).astype(int),
                         "negative": np.nansum(targets == 0, axis=0).astype(int),
                         "unknown": np.isnan(targets).sum(axis=0).astype(int)})


#: Where a table row came from: (file, 1-based line with the header as line 1), for error messages.
Origin = tuple[str, int]


def csv_origins(source: str | Path, n: int, first: int = 2) -> list[Origin]:
    """Origins of ``n`` consecutive rows of ``source`` starting at line ``first`` (2: just below a header)."""
    return [(str(source), first + i) for i in range(n)]


def describe_rows(origins: list[Origin]) -> str:
    """'rows [3, 5] of a.csv' for rows of one file, else 'a.csv row 3, b.csv row 2' (rows are 1-based lines of
    the file: a header is row 1)."""
    files = list(dict.fromkeys(f for f, _ in origins))
    if len(files) == 1:
        return f"rows {[r for _, r in origins]} of {files[0]}, 1-based lines of the file"
    return ", ".join(f"{f} row {r}" for f, r in origins) + " (1-based lines of the files)"


def inside(root: str | Path, path: str | Path) -> bool:
    """True when ``path``, normalised (``..`` folded, no symlinks followed), lies inside ``root``."""
    root, path = os.path.abspath(root), os.path.abspath(path)
    return os.path.commonpath([root, path]) == root


def resolve_inside(root: Path, base: Path, names, origins: list[Origin], column: str) -> list[str]:
    """Join each image name of an official table to ``base`` (a folder inside ``root``); a blank name, an
    absolute path or a ``..`` escape that leaves ``root`` is an error naming the file, row and value.

    Containment is lexical: symbolic links the dataset's owner put inside ``root`` are followed as usual; what
    is refused is a table cell that points elsewhere."""
    out = []
    for name, (source, row) in zip(names, origins):
        if not isinstance(name, str) or not name.strip():
            raise DatasetError(f"{source}: row {row} column {column!r}: empty image name")
        if "\x00" in name:
            raise DatasetError(f"{source}: row {row} column {column!r}: image name {shorten(name)!r} contains a "
                               "NUL byte")
        path = os.path.abspath(base / name)
        if os.path.isabs(name) or not inside(root, path):
            raise DatasetError(f"{source}: row {row} column {column!r}: image name {shorten(name)!r} resolves to "
                               f"{shorten(path)}, outside the dataset folder {os.path.abspath(root)}; names in this "
                               "table must be relative and stay inside it (no absolute paths, no '..' escapes)")
        out.append(path)
    return out


def build_table(name: str, root: Path, labels, meta: pd.DataFrame, targets: np.ndarray, *, citation: str = "",
                prompt_names=(), notes: dict | None = None, check_files: bool = True,
                source: str = "", origins: list[Origin] | None = None,
                case_targets: tuple[list[str], np.ndarray] | None = None) -> ImageTable:
    """Fill optional metadata columns, check duplicates / missing files / emptiness, and build the table.

    ``case_targets``: (case ids, [C, L]) labels of whole cases (rows group into cases by a ``case_id`` column).
    ``origins`` (one per row: file and line) lets messages name the rows of the input files; by default row i
    is line i + 2 of ``source``."""
    meta = meta.reset_index(drop=True).copy()
    meta["path"] = [os.path.abspath(p) for p in meta["path"]]
    root = Path(os.path.abspath(root))
    for col in ("view", "split", "report"):
        if col not in meta.columns:
            meta[col] = None
    if len(meta) == 0:
        raise DatasetError(f"{name}: no images listed in {source or root}")
    blank = meta["patient_id"].map(lambda v: not isinstance(v, str) or not v.strip()).to_numpy()
    if blank.any():  # "nan" would silently merge these images into one patient
        i = int(np.flatnonzero(blank)[0])
        where = f"{origins[i][0]} row {origins[i][1]}" if origins else f"{source or root} row {i + 2}"
        raise DatasetError(f"{name}: {where}: empty patient id for image {meta['path'][i]}")
    meta["patient_id"] = meta["patient_id"].astype(str)
    dup = meta["path"].duplicated(keep=False)
    if dup.any():
        first = meta["path"][dup].iloc[0]
        rows = np.flatnonzero((meta["path"] == first).to_numpy())[:6]
        where = describe_rows([origins[i] if origins else (str(source or root), int(i) + 2) for i in rows])
        raise DatasetError(f"{name}: image {first} is listed more than once ({where}); remove duplicated rows")
    if check_files:
        missing = [i for i, p in enumerate(meta["path"]) if not is_file(p)]
        if missing:
            row = f" ({origins[missing[0]][0]} row {origins[missing[0]][1]})" if origins else ""
            raise DatasetError(f"{name}: {len(missing)} image file(s) listed in {source or root} not found, e.g. "
                               f"{shorten(meta['path'][missing[0]], 300)}{row}"
                               + (f" (and {shorten(meta['path'][missing[1]], 300)})" if len(missing) > 1 else ""))
    if case_targets is not None:
        ids = tuple(str(c) for c in case_targets[0])
        case_targets = (ids, np.asarray(case_targets[1], dtype=np.float32).reshape(len(ids), len(labels)))
    return ImageTable(name, Path(root), tuple(labels), meta, np.asarray(targets, dtype=np.float32),
                      tuple(prompt_names), citation, dict(notes or {}), case_targets)


def is_file(path: str | Path) -> bool:
    """``Path.is_file`` that answers False for names the system cannot look up (too long, ...)."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def shorten(value: object, limit: int = 80) -> str:
    """A value for an error message: at most ``limit`` characters (a 100k-character cell is not echoed whole)."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def read_csv(path: Path, what: str, **kwargs) -> pd.DataFrame:
    """pandas.read_csv with a clear error for missing/unreadable files (gzip handled by the suffix)."""
    if not path.is_file():
        raise DatasetError(f"{what}: expected file {path} not found")
    try:
        return pd.read_csv(path, **kwargs)
    except Exception as exc:
        raise DatasetError(f"{what}: cannot read {path} as CSV: {exc}") from exc


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file's content; a missing/unreadable file or bytes that are not UTF-8 are a
    :class:`DatasetError` naming the file (and the line of the first bad byte)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{what}: cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DatasetError(f"{what}: {path} line {line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def read_json(path: Path, what: str):
    """A JSON document; unreadable files, non-UTF-8 bytes and invalid JSON are a :class:`DatasetError` naming the
    file, line and column."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{what} {path}: line {exc.lineno} column {exc.colno}: invalid JSON ({exc.msg})") from exc
    except RecursionError as exc:
        raise DatasetError(f"{what} {path}: invalid JSON (nested too deeply)") from exc


def require_columns(frame: pd.DataFrame, columns, source: str | Path) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DatasetError(f"{source}: missing required column(s) {missing}; columns present: "
                           f"{list(frame.columns)}")


def parse_label_values(frame: pd.DataFrame, columns, source: str | Path, allowed=(1.0, 0.0, -1.0),
                       rows: list[int] | None = None) -> np.ndarray:
    """Label columns -> float array (blank = NaN); any other value is an error naming row and column (row i is
    line ``rows[i]`` of ``source``, default i + 2: below a header)."""
    out = np.empty((len(frame), len(columns)), dtype=np.float32)
    for j, col in enumerate(columns):
        raw = frame[col]
        text = raw.where(raw.notna(), "").astype(str).str.strip()  # read as text: True, [1], inf are not labels
        num = pd.to_numeric(text, errors="coerce")
        bad = (num.isna() & (text != "")) | (num.notna() & ~num.isin(allowed))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DatasetError(f"{source}: row {rows[i] if rows else i + 2} column {col!r}: label value "
                               f"{shorten(raw.iloc[i])!r} is not one of {[int(a) for a in allowed]} or blank")
        out[:, j] = num.to_numpy(dtype=np.float32)
    return out
