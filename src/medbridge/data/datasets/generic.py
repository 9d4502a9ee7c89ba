"""Generic layouts for any other dataset: a label CSV/TSV, or one folder per class."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..images import IMAGE_SUFFIXES
from ..labels import apply_uncertainty
from ..table import (
    DatasetError,
    ImageTable,
    build_table,
    csv_origins,
    inside,
    parse_label_values,
    read_csv,
    require_columns,
    resolve_inside,
    shorten,
)
from .registry import register_dataset

IMAGE_COLUMNS = ("path", "image", "image_path", "filename", "file", "Path", "Image Index")
KNOWN_COLUMNS = {"patient_id", "patient", "report", "view", "split", "study_id", "case_id", "age", "sex"}
CASE_COLUMNS = ("case_id", "study_id")  # images of one case (data.unit: case): the first of these present

log = logging.getLogger(__name__)


def image_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """Image files below ``folder`` (sorted; symlinked folders are not entered) and the broken symbolic links
    met on the way (target missing or a link loop), which callers report instead of dropping silently."""
    images, broken = [], []
    for f in sorted(folder.rglob("*")):
        if f.is_symlink() and not f.exists():
            broken.append(f)
        elif f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
            images.append(f)
    return images, broken


def describe_broken_links(broken: list[Path], limit: int = 5) -> str:
    """'2 broken symbolic link(s) skipped: a.png -> /gone/a.png, ...' for warnings."""
    shown = ", ".join(f"{f} -> {os.readlink(f)}" for f in broken[:limit])
    return f"{len(broken)} broken symbolic link(s) skipped (target missing): {shown}" + (
        f" and {len(broken) - limit} more" if len(broken) > limit else "")


def named_columns(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """The rows below the first (header) row of a frame read with ``header=None``, named by it: a name given twice
    is an error (pandas would rename it ``Edema.1``), an unnamed column is an error unless it is blank in every row
    (a trailing separator), which is dropped."""
    names = [("" if pd.isna(c) else str(c).strip()) for c in frame.iloc[0]]
    body = frame.iloc[1:].reset_index(drop=True)
    seen: set[str] = set()
    for j, name in enumerate(names):
        if name and name in seen:
            raise DatasetError(f"{path}: column {shorten(name)!r} appears more than once in the header (columns "
                               f"{names.index(name) + 1} and {j + 1})")
        seen.add(name)
        if not name and body.iloc[:, j].notna().any():
            i = int(np.flatnonzero(body.iloc[:, j].notna().to_numpy())[0])
            raise DatasetError(f"{path}: column {j + 1} has no name in the header but a value in row {i + 2}; "
                               "name it, or remove the column")
    keep = [j for j, name in enumerate(names) if name]
    body = body.iloc[:, keep]
    body.columns = [names[j] for j in keep]
    return body


def load_csv(path: str | Path, *, image_column: str | None = None, label_columns: list[str] | None = None,
             labels_column: str | None = None, separator: str = "|", patient_column: str | None = None,
             report_column: str | None = None, view_column: str | None = None, split_column: str | None = None,
             image_root: str | Path | None = None, uncertain: str = "ignore", blank: str = "ignore",
             check_files: bool = True, name: str | None = None, restrict_paths: bool = False) -> ImageTable:
    """Load a CSV (``.csv``) or TSV (``.tsv``/``.txt``) with one row per image.

    - ``image_column``: relative (to ``image_root``, default the CSV's folder) or absolute paths; default: the
      first of ``path``, ``image``, ``image_path``, ``filename``, ``file``.
    - Labels either as one column per label with 1 / 0 / -1 / blank (``label_columns``; default: every column
      not used otherwise), or one ``labels_column`` of ``separator``-delimited names (empty = no finding).
    - Optional ``patient_column`` (default ``patient_id``/``patient`` if present, else the image is its own
      patient), ``report_column``, ``view_column``, ``split_column`` (train/val/test).
    Blank label cells are unknown (NaN) by default (``blank="zeros"`` reads them as negative).

    Containment: relative paths whose ``..`` leave ``image_root`` are loaded but reported in one warning naming
    the rows (``table.notes["outside_image_root"]`` lists them); ``restrict_paths=True`` refuses them and
    absolute paths instead (for CSVs from elsewhere), as the official layouts always do."""
    path = Path(path)
    sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    # only a blank cell is missing (NA, None, null are text: refused as labels); the header is read as written
    frame = read_csv(path, "CSV dataset", sep=sep, dtype=str, keep_default_na=False, na_values=[""], header=None)
    if frame.empty:
        raise DatasetError(f"{path}: empty file (expected a header row and one row per image)")
    frame = named_columns(frame, path)
    if image_column is None:
        image_column = next((c for c in IMAGE_COLUMNS if c in frame.columns), None)
        if image_column is None:
            raise DatasetError(f"{path}: no image-path column; name it one of {list(IMAGE_COLUMNS)} or pass "
                               f"image_column (columns present: {list(frame.columns)})")
    patient_column = patient_column or next((c for c in ("patient_id", "patient") if c in frame.columns), None)
    report_column = report_column or ("report" if "report" in frame.columns else None)
    view_column = view_column or ("view" if "view" in frame.columns else None)
    split_column = split_column or ("split" if "split" in frame.columns else None)
    used = {image_column, patient_column, report_column, view_column, split_column, labels_column} - {None}
    require_columns(frame, sorted(used), path)
    if labels_column is not None:
        tokens = frame[labels_column].fillna("").map(lambda s: [t.strip() for t in str(s).split(separator)
                                                                  if t.strip()])
        labels = sorted({t for toks in tokens for t in toks})
        if not labels:
            raise DatasetError(f"{path}: column {labels_column!r} names no labels")
        targets = np.array([[float(lab in toks) for lab in labels] for toks in tokens], dtype=np.float32)
    else:
        label_columns = label_columns or [c for c in frame.columns if c not in used and c not in KNOWN_COLUMNS]
        if not label_columns:
            raise DatasetError(f"{path}: no label columns (columns present: {list(frame.columns)})")
        require_columns(frame, label_columns, path)
        labels = list(label_columns)
        targets = apply_uncertainty(parse_label_values(frame, labels, path), uncertain, blank)
    base = Path(image_root) if image_root else path.parent
    images = frame[image_column]
    if images.isna().any():
        i = int(images.isna().to_numpy().nonzero()[0][0])
        raise DatasetError(f"{path}: row {i + 2} column {image_column!r}: empty image path")
    origins = csv_origins(path, len(frame))
    notes = {}
    if restrict_paths:
        paths = resolve_inside(base, base, images.str.strip(), origins, image_column)
    else:
        paths = [str(p if Path(p).is_absolute() else base / p) for p in images.str.strip()]
        escapes = [i + 2 for i, p in enumerate(images.str.strip())
                   if not Path(p).is_absolute() and not inside(base, base / p)]
        if escapes:
            notes["outside_image_root"] = escapes
            log.warning("%s: %d relative image path(s) leave the image root %s through '..' (rows %s%s), e.g. %r; "
                        "they are loaded as written (pass image_root= to the folder that holds them, or "
                        "restrict_paths=True to refuse them)", path, len(escapes), base, escapes[:10],
                        " ..." if len(escapes) > 10 else "", images.iloc[escapes[0] - 2])
    split = frame[split_column].str.strip().str.lower().replace({"valid": "val", "validate": "val",
                                                                "validation": "val"}) if split_column else None
    if split is not None and (~split.isin(["train", "val", "test"]) & split.notna()).any():
        i = int((~split.isin(["train", "val", "test"]) & split.notna()).to_numpy().nonzero()[0][0])
        raise DatasetError(f"{path}: row {i + 2} column {split_column!r}: {shorten(frame[split_column].iloc[i])!r} "
                           "is not train / val / test")
    meta = pd.DataFrame({"path": paths,
                         "patient_id": frame[patient_column] if patient_column else images.str.strip(),
                         "view": frame[view_column].str.upper() if view_column else None,
                         "split": split, "report": frame[report_column] if report_column else None})
    case_column = next((c for c in CASE_COLUMNS if c in frame.columns), None)
    if case_column:
        meta["case_id"] = frame[case_column].str.strip()
    return build_table(name or path.stem, base, labels, meta, targets, check_files=check_files, source=str(path),
                       origins=origins, notes=notes)


def load_folder(root: str | Path, *, check_files: bool = True, name: str | None = None) -> ImageTable:
    """One sub-folder per class (``root/<class>/*.png``): each image is positive for its folder's class and
    negative for the others. The file stem is the patient id (use a CSV when patients have several images)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"folder dataset: {root} is not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DatasetError(f"folder dataset {root}: expected one sub-folder per class, found none")
    rows, targets, broken = [], [], []
    for j, cls in enumerate(classes):
        files, dangling = image_files(root / cls)
        broken += dangling
        for f in files:
            rows.append({"path": str(f), "patient_id": f.stem, "view": None, "split": None, "report": None})
            targets.append(np.eye(len(classes), dtype=np.float32)[j])
    if broken:
        log.warning("folder dataset %s: %s", root, describe_broken_links(broken))
    if not rows:
        raise DatasetError(f"folder dataset {root}: no images ({sorted(IMAGE_SUFFIXES)}) in {classes}")
    return build_table(name or root.name, root, classes, pd.DataFrame(rows), np.stack(targets),
                       check_files=check_files, source=str(root),
                       notes={"broken_links": [str(f) for f in broken]} if broken else None)


def is_label_file(path: Path) -> bool:
    """A file given as the dataset: a generic label CSV/TSV."""
    return path.is_file()


def is_class_folders(path: Path) -> bool:
    """A folder with sub-folders: one class per folder (the fallback, tried last)."""
    return path.is_dir() and any(d.is_dir() for d in path.iterdir())


def register() -> None:
    """Register ``csv`` and ``folder`` (called by ``register_builtin_datasets``)."""
    register_dataset("csv", load_csv, is_label_file,
                     description="any CSV/TSV: an image column plus one column per label (or a |-list column)",
                     files=("a CSV/TSV file (path/image/filename, label columns; patient_id, report, view, split, "
                            "case_id optional)",), priority=100)
    register_dataset("folder", load_folder, is_class_folders, description="one folder per class",
                     files=("<class>/*.png|jpg|dcm",), priority=-100)
