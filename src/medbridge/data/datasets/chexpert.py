"""CheXpert v1.0 / CheXpert-v1.0-small (Irvin et al., AAAI 2019) and CheXpert Plus (Chambon et al. 2024)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..labels import CHEXPERT_LABELS, apply_uncertainty
from ..table import (
    DatasetError,
    ImageTable,
    build_table,
    csv_origins,
    parse_label_values,
    read_csv,
    read_text,
    require_columns,
    resolve_inside,
)
from .registry import has_any_file, register_dataset

CITATION = ("Irvin J. et al. CheXpert: a large chest radiograph dataset with uncertainty labels and expert "
            "comparison. AAAI 2019.")
CITATION_PLUS = ("Chambon P. et al. CheXpert Plus: augmenting a large chest X-ray dataset with text radiology "
                 "reports, patient demographics and additional image formats. arXiv:2405.19538 (2024).")
PREFIXES = ("CheXpert-v1.0-small/", "CheXpert-v1.0/")
PLUS_CSV = "df_chexpert_plus_240401.csv"
PLUS_LABEL_FILES = ("impression_fixed.json", "findings_fixed.json", "report_fixed.json")


def _view(frontal_lateral: pd.Series, ap_pa: pd.Series) -> list[str | None]:
    out = []
    for fl, ap in zip(frontal_lateral, ap_pa):  # blank cells are NaN (a float column when all are blank)
        fl = fl.strip().lower() if isinstance(fl, str) else ""
        ap = ap.strip().upper() if isinstance(ap, str) else ""
        if fl == "lateral":
            out.append("LATERAL")
        elif ap in ("AP", "PA", "LL", "RL"):
            out.append(ap)
        else:
            out.append("FRONTAL" if fl == "frontal" else None)
    return out


def _strip_prefix(rel: str) -> str:
    """'CheXpert-v1.0-small/train/...' -> 'train/...' (the release folder name the CSVs carry)."""
    for prefix in PREFIXES:
        if rel.startswith(prefix):
            return rel[len(prefix):]
    return rel


def load_chexpert(root: str | Path, *, uncertain: str = "ignore", blank: str = "zeros",
                  check_files: bool = True) -> ImageTable:
    """Load CheXpert v1.0 or v1.0-small: ``train.csv`` + ``valid.csv`` (official split train/val) and the
    ``train/`` ``valid/`` image folders; ``Path`` values' ``CheXpert-v1.0(-small)/`` prefix is stripped.
    Labels as written (1/0/-1/blank) mapped by ``uncertain`` and ``blank``; "No Finding" is kept as a label
    exactly as annotated (no rule zeroes other labels)."""
    root = Path(root)
    parts = []
    for fname, split in (("train.csv", "train"), ("valid.csv", "val")):
        f = root / fname
        if not f.is_file():
            if split == "val":
                continue
            raise DatasetError(f"CheXpert: expected {f} (train.csv / valid.csv of CheXpert v1.0)")
        frame = read_csv(f, "CheXpert", dtype={"Path": str})
        require_columns(frame, ["Path", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS], f)
        raw = parse_label_values(frame, CHEXPERT_LABELS, f)
        parts.append((frame, raw, split, csv_origins(f, len(frame))))
    frame = pd.concat([p[0] for p in parts], ignore_index=True)
    raw = np.concatenate([p[1] for p in parts])
    split = sum(([p[2]] * len(p[0]) for p in parts), [])
    origins = sum((p[3] for p in parts), [])
    rel = [_strip_prefix(v.strip()) if isinstance(v, str) else v for v in frame["Path"]]
    paths = resolve_inside(root, root, rel, origins, "Path")
    patient = pd.Series(rel, dtype=object).str.extract(r"(patient\d+)")[0]
    if patient.isna().any():
        i = int(patient.isna().to_numpy().nonzero()[0][0])
        raise DatasetError(f"{origins[i][0]}: row {origins[i][1]} column 'Path': {frame['Path'].iloc[i]!r} has no "
                           "patientNNNNN part")
    study = pd.Series(rel, dtype=object).str.extract(r"(patient\d+/study\d+)")[0]  # a case: the study's images
    meta = pd.DataFrame({"path": paths, "patient_id": patient,
                         "view": _view(frame["Frontal/Lateral"], frame["AP/PA"]), "split": split, "report": None,
                         "sex": frame.get("Sex"), "age": frame.get("Age"), "case_id": study})
    return build_table("chexpert", root, CHEXPERT_LABELS, meta, apply_uncertainty(raw, uncertain, blank),
                       citation=CITATION, check_files=check_files, source=str(root / "train.csv"), origins=origins,
                       notes={"uncertain": uncertain, "blank": blank})


def _read_json_lines(path: Path) -> pd.DataFrame:
    """A JSON-lines file as a frame (column ``_line``: the 1-based line each row came from); a line that is not
    a JSON object is an error naming the file and line."""
    rows = []
    for i, line in enumerate(read_text(path, "CheXpert Plus labels").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise DatasetError(f"{path}: line {i} is not valid JSON (CheXbert label files are JSON lines, one "
                               f"object per line): {exc}") from exc
        if not isinstance(row, dict):
            raise DatasetError(f"{path}: line {i}: expected a JSON object {{...}}, got {type(row).__name__}")
        rows.append({**row, "_line": i})
    return pd.DataFrame(rows)


def _plus_image_root(root: Path) -> Path:
    for cand in (root / "PNG" / "PNG", root / "PNG", root):
        if (cand / "train").is_dir() or (cand / "valid").is_dir():
            return cand
    return root / "PNG"


def load_chexpert_plus(root: str | Path, *, label_source: str = "impression", uncertain: str = "ignore",
                       blank: str = "zeros", check_files: bool = True) -> ImageTable:
    """Load CheXpert Plus: ``df_chexpert_plus_240401.csv`` (reports by section, patient ids, split) and CheXbert
    labels from ``chexbert_labels/{impression,findings,report}_fixed.json`` (JSON lines, merged on
    path_to_image). Images are the PNG release under ``PNG/PNG/`` or ``PNG/`` (``.jpg`` names mapped to ``.png``)
    . Report text = findings + impression sections. Official split: train / valid (-> val); no test split."""
    root = Path(root)
    csv = root / PLUS_CSV
    frame = read_csv(csv, "CheXpert Plus", dtype={"path_to_image": str, "deid_patient_id": str})
    require_columns(frame, ["path_to_image", "deid_patient_id", "frontal_lateral", "ap_pa", "split",
                            "section_findings", "section_impression"], csv)
    lab_file = root / "chexbert_labels" / f"{label_source}_fixed.json"
    if f"{label_source}_fixed.json" not in PLUS_LABEL_FILES:
        raise DatasetError(f"CheXpert Plus label_source must be impression, findings or report, got {label_source!r}")
    if not lab_file.is_file():
        raise DatasetError(f"CheXpert Plus: expected CheXbert labels {lab_file}")
    labels = _read_json_lines(lab_file)
    require_columns(labels, ["path_to_image", *CHEXPERT_LABELS], lab_file)
    keys = labels["path_to_image"]
    not_text = ~keys.map(lambda v: isinstance(v, str))
    if not_text.any():
        i = int(np.flatnonzero(not_text.to_numpy())[0])
        raise DatasetError(f"{lab_file}: line {labels['_line'].iloc[i]}: path_to_image {keys.iloc[i]!r} is not a "
                           "string")
    if keys.duplicated().any():
        p = keys[keys.duplicated()].iloc[0]
        lines = labels["_line"][keys == p].tolist()[:6]
        raise DatasetError(f"{lab_file}: image {p} has more than one label line (lines {lines})")
    raw = parse_label_values(labels, CHEXPERT_LABELS, lab_file, rows=labels["_line"].tolist())
    values = pd.DataFrame(raw, columns=list(CHEXPERT_LABELS))
    values["path_to_image"] = keys.to_numpy()
    frame = frame.drop(columns=[c for c in CHEXPERT_LABELS if c in frame.columns])  # labels come from lab_file
    frame["_row"] = np.arange(len(frame)) + 2
    merged = frame.merge(values, on="path_to_image", how="inner")
    if len(merged) == 0:
        raise DatasetError(f"CheXpert Plus: no path_to_image in {lab_file} matches {csv}")
    origins = [(str(csv), int(r)) for r in merged["_row"]]
    image_root = _plus_image_root(root)
    rel = merged["path_to_image"].str.strip().str.replace(r"\.jpe?g$", ".png", regex=True)
    paths = resolve_inside(root, image_root, rel, origins, "path_to_image")
    report = [" ".join(str(x) for x in (f, i) if isinstance(x, str) and x.strip()) or None
              for f, i in zip(merged["section_findings"], merged["section_impression"])]
    meta = pd.DataFrame({"path": paths, "patient_id": merged["deid_patient_id"],
                         "view": _view(merged["frontal_lateral"], merged["ap_pa"]),
                         "split": merged["split"].map({"train": "train", "valid": "val", "test": "test"}),
                         "report": report, "sex": merged.get("sex"), "age": merged.get("age")})
    targets = apply_uncertainty(merged[list(CHEXPERT_LABELS)].to_numpy(dtype="float32"), uncertain, blank)
    return build_table("chexpert-plus", root, CHEXPERT_LABELS, meta, targets, citation=CITATION_PLUS,
                       check_files=check_files, source=str(csv), origins=origins,
                       notes={"label_source": label_source, "uncertain": uncertain, "blank": blank})


def register() -> None:
    """Register ``chexpert`` and ``chexpert-plus`` (called by ``register_builtin_datasets``). CheXpert Plus is
    tried first: its folder may hold CheXpert's ``train.csv`` too."""
    register_dataset("chexpert", load_chexpert, has_any_file("train.csv"), CITATION,
                     description="CheXpert v1.0 / v1.0-small: 14 labels, official train/valid",
                     files=("train.csv", "valid.csv", "train/", "valid/"))
    register_dataset("chexpert-plus", load_chexpert_plus, has_any_file(PLUS_CSV), CITATION_PLUS,
                     description="CheXpert Plus: 14 CheXbert labels, official train/valid, reports",
                     files=(PLUS_CSV, "chexbert_labels/{impression,findings,report}_fixed.json", "PNG/"),
                     priority=10)
