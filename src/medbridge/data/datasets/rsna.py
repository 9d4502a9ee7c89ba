"""RSNA Pneumonia Detection Challenge (Kaggle 2018; Shih et al., Radiology: AI 2019)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..table import DatasetError, ImageTable, build_table, read_csv, require_columns, resolve_inside
from .registry import has_any_file, register_dataset

CITATION = ("Shih G. et al. Augmenting the National Institutes of Health chest radiograph dataset with expert "
            "annotations of possible pneumonia. Radiology: Artificial Intelligence 1(1), 2019.")
LABELS = ("Pneumonia",)


def _dicom_view(pydicom, path: str) -> str | None:
    """ViewPosition (PA/AP) from a DICOM header; an unreadable header is an error naming the file."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["ViewPosition"])
    except Exception as exc:  # InvalidDicomError, OSError, struct errors from truncated headers
        raise DatasetError(f"RSNA: cannot read the DICOM header of {path} for its view: {exc}") from exc
    return str(ds.get("ViewPosition", "")).upper() or None


def load_rsna(root: str | Path, *, read_views: bool = False, check_files: bool = True) -> ImageTable:
    """Load the RSNA Pneumonia training set: ``stage_2_train_labels.csv`` (one row per box; the image label is the
    max ``Target`` over its rows) and ``stage_2_train_images/<patientId>.dcm``. One label, "Pneumonia" (lung
    opacity suggestive of pneumonia); one image per patientId; no official validation/test labels, so split by
    patient. ``read_views`` reads each DICOM header's ViewPosition (PA/AP) for view filtering.
    Note: RSNA images are a subset of NIH ChestX-ray14 — do not train on one and test on the other."""
    root = Path(root)
    csv = root / "stage_2_train_labels.csv"
    frame = read_csv(csv, "RSNA Pneumonia", dtype={"patientId": str})
    require_columns(frame, ["patientId", "Target"], csv)
    target = pd.to_numeric(frame["Target"], errors="coerce")
    bad = ~target.isin([0, 1])
    if bad.any():
        i = int(bad.to_numpy().nonzero()[0][0])
        raise DatasetError(f"{csv}: row {i + 2} column 'Target': {frame['Target'].iloc[i]!r} is not 0 or 1")
    ids = frame["patientId"].fillna("").str.strip()
    first_row = {}
    for i, pid in enumerate(ids):
        first_row.setdefault(pid, i + 2)
    by_image = frame.assign(Target=target, patientId=ids).groupby("patientId", sort=False)["Target"]
    per_image, boxes = by_image.max(), by_image.sum()
    ids = per_image.index
    origins = [(str(csv), first_row[i]) for i in ids]
    folder = root / "stage_2_train_images"
    paths = resolve_inside(root, folder, [f"{i}.dcm" if i else "" for i in ids], origins, "patientId")
    views = [None] * len(ids)
    if read_views:
        import pydicom

        views = [_dicom_view(pydicom, p) for p in paths]
    meta = pd.DataFrame({"path": paths, "patient_id": ids, "view": views, "split": None, "report": None,
                         "boxes": boxes.to_numpy().astype(int)})
    return build_table("rsna-pneumonia", root, LABELS, meta, per_image.to_numpy()[:, None], citation=CITATION,
                       check_files=check_files, source=str(csv), origins=origins)


def register() -> None:
    """Register the ``rsna`` format (called by ``register_builtin_datasets``)."""
    register_dataset("rsna", load_rsna, has_any_file("stage_2_train_labels.csv"), CITATION,
                     description="RSNA Pneumonia Detection Challenge (DICOM): Pneumonia, patient split",
                     files=("stage_2_train_labels.csv", "stage_2_train_images/<patientId>.dcm"))
