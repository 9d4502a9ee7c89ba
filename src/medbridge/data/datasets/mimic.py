"""MIMIC-CXR-JPG v2.0.0/v2.1.0 (Johnson et al. 2019) with reports from MIMIC-CXR v2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..labels import CHEXPERT_LABELS, apply_uncertainty
from ..reports import findings_impression
from ..table import (
    DatasetError,
    ImageTable,
    build_table,
    parse_label_values,
    read_csv,
    require_columns,
    resolve_inside,
)
from .registry import has_any_file, register_dataset

CITATION = ("Johnson A.E.W. et al. MIMIC-CXR-JPG, a large publicly available database of labeled chest radiographs. "
            "arXiv:1901.07042 (2019); MIMIC-CXR, Scientific Data 6:317 (2019). PhysioNet credentialed access.")
LABELERS = ("chexpert", "negbio")
SPLIT_NAMES = {"train": "train", "validate": "val", "test": "test"}
META_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime")


def _check_ids(frame: pd.DataFrame, columns, source: Path) -> None:
    """subject_id / study_id are integers in MIMIC-CXR: anything else (blank, '../x') is an error naming the row."""
    for col in columns:
        ok = frame[col].map(lambda v: isinstance(v, str) and v.strip().isdigit() and v.strip().isascii())
        if not ok.all():
            i = int(np.flatnonzero(~ok.to_numpy())[0])
            raise DatasetError(f"{source}: row {i + 2} column {col!r}: {frame[col].iloc[i]!r} is not a numeric id")


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.csv.gz", f"{stem}.csv"):
        if (root / name).is_file():
            return root / name
    raise DatasetError(f"MIMIC-CXR-JPG: expected {stem}.csv.gz (or .csv) in {root}")


def load_mimic(root: str | Path, *, labeler: str = "chexpert", uncertain: str = "ignore", blank: str = "zeros",
               reports: bool = True, reports_root: str | Path | None = None, drop_unlabeled: bool = True,
               check_files: bool = True) -> ImageTable:
    """Load MIMIC-CXR-JPG from its PhysioNet folder.

    Expects ``mimic-cxr-2.0.0-{metadata,split,chexpert|negbio}.csv.gz`` and images at
    ``files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg``. Labels are per study (joined on subject_id + study_id),
    values 1/0/-1/blank mapped by ``uncertain`` / ``blank`` (see :func:`apply_uncertainty`). Studies without a
    label row are dropped (``drop_unlabeled``) or kept all-NaN. The official split column's "validate" becomes
    "val". Reports (``sXXXXXXXX.txt`` beside the study folders, from mimic-cxr-reports.zip, under ``reports_root``
    or ``root``) give FINDINGS + IMPRESSION text where present. Images of one study form a case (``case_id``:
    ``data.unit: case`` classifies a study from all its images, as the labels are given)."""
    root = Path(root)
    if labeler not in LABELERS:
        raise DatasetError(f"MIMIC-CXR labeler must be one of {LABELERS}, got {labeler!r}")
    meta_csv, split_csv, label_csv = (_find(root, f"mimic-cxr-2.0.0-{s}") for s in ("metadata", "split", labeler))
    meta = read_csv(meta_csv, "MIMIC-CXR metadata", dtype={"dicom_id": str, "subject_id": str, "study_id": str})
    require_columns(meta, ["dicom_id", "subject_id", "study_id", "ViewPosition"], meta_csv)
    _check_ids(meta, ["subject_id", "study_id"], meta_csv)
    meta = meta[[c for c in META_COLUMNS if c in meta.columns]].assign(_row=np.arange(len(meta)) + 2)
    split = read_csv(split_csv, "MIMIC-CXR split", dtype=str)
    require_columns(split, ["dicom_id", "split"], split_csv)
    ids = split["dicom_id"].fillna("")
    dup = ids.duplicated(keep=False)
    if dup.any():
        rows = (np.flatnonzero((ids == ids[dup].iloc[0]).to_numpy()) + 2).tolist()
        raise DatasetError(f"{split_csv}: dicom_id {ids[dup].iloc[0]!r} is listed more than once "
                           f"(rows {rows[:6]} counting the header as row 1)")
    bad = ~split["split"].isin(list(SPLIT_NAMES))
    if bad.any():
        i = int(bad.to_numpy().nonzero()[0][0])
        raise DatasetError(f"{split_csv}: row {i + 2} column 'split': {split['split'].iloc[i]!r} is not one of "
                           f"{list(SPLIT_NAMES)}")
    lab = read_csv(label_csv, "MIMIC-CXR labels", dtype={"subject_id": str, "study_id": str})
    require_columns(lab, ["subject_id", "study_id", *CHEXPERT_LABELS], label_csv)
    raw = parse_label_values(lab, CHEXPERT_LABELS, label_csv)
    if lab.duplicated(["subject_id", "study_id"]).any():
        i = int(lab.duplicated(["subject_id", "study_id"]).to_numpy().nonzero()[0][0])
        raise DatasetError(f"{label_csv}: row {i + 2}: study {lab['study_id'].iloc[i]} is listed more than once")
    lab_values = pd.DataFrame(apply_uncertainty(raw, uncertain, blank), columns=list(CHEXPERT_LABELS))
    lab_values["_key"] = (lab["subject_id"] + "/" + lab["study_id"]).to_numpy()
    lab_values["_labelled"] = True
    frame = meta.merge(split[["dicom_id", "split"]], on="dicom_id", how="left")
    frame["_key"] = frame["subject_id"] + "/" + frame["study_id"]
    frame = frame.merge(lab_values, on="_key", how="left")
    if drop_unlabeled:
        frame = frame[frame["_labelled"].eq(True)].reset_index(drop=True)
    sid, study = frame["subject_id"].str.strip(), frame["study_id"].str.strip()
    folder = root / "files"
    origins = [(str(meta_csv), int(r)) for r in frame["_row"]]
    names = [f"p{s[:2]}/p{s}/s{t}/{d.strip()}.jpg" if isinstance(d, str) and d.strip() else ""
             for s, t, d in zip(sid, study, frame["dicom_id"])]
    paths = resolve_inside(root, folder, names, origins, "dicom_id")
    texts = [None] * len(frame)
    if reports:
        rfolder = Path(reports_root) / "files" if reports_root else folder
        if not rfolder.is_dir() and reports_root:
            rfolder = Path(reports_root)
        cache: dict[str, str | None] = {}
        for i, (s, t) in enumerate(zip(sid, study)):
            if t not in cache:
                f = rfolder / f"p{s[:2]}" / f"p{s}" / f"s{t}.txt"
                cache[t] = findings_impression(f.read_text(errors="replace")) if f.is_file() else None
            texts[i] = cache[t]
    out = pd.DataFrame({"path": paths, "patient_id": sid, "study_id": study, "case_id": sid + "/" + study,
                        "view": frame["ViewPosition"].astype(str).str.strip().str.upper().replace({"NAN": None}),
                        "split": frame["split"].map(SPLIT_NAMES), "report": texts,
                        "study_date": frame.get("StudyDate"), "study_time": frame.get("StudyTime")})
    targets = frame[list(CHEXPERT_LABELS)].to_numpy(dtype="float32")
    return build_table("mimic-cxr", root, CHEXPERT_LABELS, out, targets, citation=CITATION, check_files=check_files,
                       source=str(meta_csv), origins=origins,
                       notes={"labeler": labeler, "uncertain": uncertain, "blank": blank})


def register() -> None:
    """Register the ``mimic-cxr`` format (called by ``register_builtin_datasets``)."""
    register_dataset("mimic-cxr", load_mimic,
                     has_any_file("mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.csv"), CITATION,
                     description="MIMIC-CXR-JPG: 14 CheXpert labels per study, official split, reports",
                     files=("mimic-cxr-2.0.0-{metadata,split,chexpert|negbio}.csv(.gz)",
                            "files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg", "sXXXXXXXX.txt reports (optional)"))
