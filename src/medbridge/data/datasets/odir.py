"""ODIR-5K (Ocular Disease Intelligent Recognition, Peking University 2019): colour fundus photographs of both eyes,
eight patient-level labels; per-eye labels derived from the per-eye diagnostic keywords."""

from __future__ import annotations

import difflib
from pathlib import Path

import numpy as np
import pandas as pd

from ..table import (
    DatasetError,
    ImageTable,
    build_table,
    parse_label_values,
    read_csv,
    require_columns,
    resolve_inside,
)
from .registry import register_dataset

CITATION = ("Peking University / Shanggong Medical Technology. ODIR-2019: Ocular Disease Intelligent Recognition "
            "grand challenge, https://odir2019.grand-challenge.org (2019); Li N. et al. A benchmark of ocular "
            "disease intelligent recognition: one shot for multi-disease detection. BenchCouncil 2020.")
LABELS = ("N", "D", "G", "C", "A", "H", "M", "O")
PROMPT_NAMES = ("normal fundus", "diabetic retinopathy", "glaucoma", "cataract", "age-related macular degeneration",
                "hypertensive retinopathy", "pathological myopia", "other fundus abnormality")
SHEET_NAMES = ("ODIR-5K_Training_Annotations(Updated)_V2.xlsx", "ODIR-5K_Training_Annotations(Updated).xlsx",
               "ODIR-5K_Training_Annotations.xlsx")
IMAGE_FOLDERS = ("Training Images", "ODIR-5K_Training_Dataset", "preprocessed_images", "images")
SHEET_COLUMNS = ("ID", "Patient Age", "Patient Sex", "Left-Fundus", "Right-Fundus", "Left-Diagnostic Keywords",
                 "Right-Diagnostic Keywords")
KEYWORD_SEPARATOR = "，"  # full-width comma, as in the official sheet (an ASCII comma is accepted too)

#: Diagnostic keyword -> per-eye label (the full keyword list of the official training sheet). Annotation-quality
#: keywords (``NO_LABEL``) say nothing about disease: an eye with only those and "normal fundus" is N.
KEYWORD_LABELS: dict[str, str] = {
    "normal fundus": "N",
    **dict.fromkeys(("mild nonproliferative retinopathy", "moderate non proliferative retinopathy",
                     "severe nonproliferative retinopathy", "proliferative diabetic retinopathy",
                     "severe proliferative diabetic retinopathy", "diabetic retinopathy",
                     "suspected diabetic retinopathy"), "D"),
    **dict.fromkeys(("glaucoma", "suspected glaucoma"), "G"),
    "cataract": "C",
    **dict.fromkeys(("dry age-related macular degeneration", "wet age-related macular degeneration"), "A"),
    "hypertensive retinopathy": "H",
    **dict.fromkeys(("pathological myopia", "myopic maculopathy"), "M"),
    **dict.fromkeys((
        "macular epiretinal membrane", "epiretinal membrane", "epiretinal membrane over the macula",
        "optic disk epiretinal membrane", "suspected macular epimacular membrane", "drusen",
        "myelinated nerve fibers", "vitreous degeneration", "refractive media opacity", "maculopathy",
        "laser spot", "post laser photocoagulation", "branch retinal vein occlusion",
        "old branch retinal vein occlusion", "central retinal vein occlusion", "old central retinal vein occlusion",
        "central retinal artery occlusion", "branch retinal artery occlusion", "retinal artery macroaneurysm",
        "optic nerve atrophy", "optic disc edema", "optic discitis", "optic disk photographically invisible ",
        "vessel tortuosity", "white vessel", "spotted membranous change", "atrophic change", "retina fold",
        "chorioretinal atrophy", "diffuse chorioretinal atrophy", "diffuse retinal atrophy", "retinal pigmentation",
        "retinal pigment epithelial hypertrophy", "retinal pigment epithelium atrophy", "choroidal nevus",
        "tessellated fundus", "peripapillary atrophy", "macular hole", "macular coloboma", "morning glory syndrome",
        "retinochoroidal coloboma", "rhegmatogenous retinal detachment", "retinitis pigmentosa",
        "congenital choroidal coloboma", "oval yellow-white atrophy", "pigmentation disorder",
        "arteriosclerosis", "wedge-shaped change", "wedge white line change", "asteroid hyalosis",
        "abnormal pigment ", "fundus laser photocoagulation spots", "intraretinal hemorrhage",
        "intraretinal microvascular abnormality", "glial remnants anterior to the optic disc",
        "silicone oil eye", "depigmentation of the retinal pigment epithelium", "old chorioretinopathy",
        "punctate inner choroidopathy", "central serous chorioretinopathy", "myopia retinopathy",
        "post retinal photocoagulation", "epiretinal membrane over the optic disc", "vitreous opacity",
        "suspicious diabetic retinopathy", "old choroiditis", "choroidal hemangioma", "macular pigmentation disorder",
        "retinal detachment", "pigment epithelium proliferation", "chorioretinal scar", "retinal vascular sheathing",
        "macular epimacular membrane", "hypertensive retinopathy,diabetic retinopathy", "fundus calcification",
    ), "O"),
}
#: Keywords about the photograph, not the eye: no label.
NO_LABEL = ("lens dust", "low image quality", "optic disk photographically invisible", "image offset",
            "no fundus image", "anterior segment image")
KEYWORD_LABELS = {k.strip(): v for k, v in KEYWORD_LABELS.items()}


def split_keywords(cell) -> list[str]:
    """A keyword cell -> its keywords (full-width or ASCII comma separated, stripped, lower case)."""
    if not isinstance(cell, str):
        return []
    return [k.strip().lower() for k in cell.replace(KEYWORD_SEPARATOR, ",").split(",") if k.strip()]


def eye_labels(keywords: list[str], where: str) -> np.ndarray:
    """Per-eye label vector (N D G C A H M O) from one eye's keywords; an unknown keyword is an error naming
    ``where`` and the closest known keywords (we do not guess: a new keyword needs a decision in the map)."""
    out = np.zeros(len(LABELS), dtype=np.float32)
    for k in keywords:
        if k in NO_LABEL:
            continue
        if k not in KEYWORD_LABELS:
            close = difflib.get_close_matches(k, [*KEYWORD_LABELS, *NO_LABEL], n=3)
            raise DatasetError(f"{where}: unknown diagnostic keyword {k[:80]!r}"
                               + (f" (did you mean {', '.join(map(repr, close))}?)" if close else "")
                               + "; known keywords: medbridge.data.datasets.odir.KEYWORD_LABELS")
        out[LABELS.index(KEYWORD_LABELS[k])] = 1.0
    if out[1:].any():  # a disease keyword beside "normal fundus" (never in the sheet): not normal
        out[0] = 0.0
    elif not keywords or all(k in NO_LABEL for k in keywords):
        out[:] = np.nan  # nothing known about this eye
    return out


def patient_from_eyes(eyes: np.ndarray) -> np.ndarray:
    """The official patient-level rule from per-eye labels [..., n_eyes, 8]: a disease is positive when either eye
    has it; N (normal) only when every eye with known labels is normal and no disease is present."""
    disease = np.nanmax(np.where(np.isnan(eyes[..., 1:]), 0, eyes[..., 1:]), axis=-2)
    normal = (np.nan_to_num(eyes[..., 0], nan=1.0).min(axis=-1) == 1) & (disease.max(axis=-1) == 0)
    return np.concatenate([normal[..., None].astype(np.float32), disease.astype(np.float32)], axis=-1)


def find_sheet(root: Path) -> Path | None:
    for base in (root, root / "ODIR-5K"):
        for name in (*SHEET_NAMES, "full_df.csv"):
            if (base / name).is_file():
                return base / name
    return None


def is_odir(root: Path) -> bool:
    return root.is_dir() and find_sheet(root) is not None


def read_sheet(path: Path) -> pd.DataFrame:
    """The official annotation sheet through openpyxl (pandas' xlsx reader), every cell as text."""
    try:
        frame = pd.read_excel(path, dtype=str, engine="openpyxl")
    except ImportError as exc:
        raise DatasetError(f"ODIR-5K: reading {path.name} needs openpyxl (pip install openpyxl)") from exc
    except Exception as exc:  # zip/xml errors of a damaged or non-xlsx file
        raise DatasetError(f"ODIR-5K: cannot read {path} as an xlsx sheet: {type(exc).__name__}: "
                           f"{str(exc)[:200]}") from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def _images_folder(base: Path) -> Path:
    for name in IMAGE_FOLDERS:
        if (base / name).is_dir():
            return base / name
    return base


def _from_kaggle(csv: Path) -> pd.DataFrame:
    """Kaggle's ``full_df.csv`` (one row per eye, both keyword columns repeated) -> one row per patient."""
    frame = read_csv(csv, "ODIR-5K (Kaggle full_df.csv)", dtype=str, keep_default_na=False)
    require_columns(frame, [*SHEET_COLUMNS, *LABELS], csv)
    frame = frame.assign(_row=np.arange(len(frame)) + 2).drop_duplicates("ID", keep="first")
    return frame


def load_odir(root: str | Path, *, check_files: bool = True) -> ImageTable:
    """Load ODIR-5K from its official layout: the annotation sheet (``ODIR-5K_Training_Annotations(Updated)_V2
    .xlsx``, at the root or in ``ODIR-5K/``) and ``Training Images/{ID}_left.jpg|_right.jpg`` beside it; or
    Kaggle's ``full_df.csv`` with ``preprocessed_images/``.

    One row per EYE. ``targets`` are the per-eye labels derived from that eye's diagnostic keywords
    (:data:`KEYWORD_LABELS`; an eye whose only keywords describe the photograph, e.g. "lens dust", is unknown =
    NaN); the official PATIENT labels (N D G C A H M O columns) are the case labels (``case_id`` = patient ID:
    ``data.unit: case`` classifies a patient from both eyes, the challenge's task, and is the default for this
    dataset). Metadata: ``eye`` (left/right), ``age``, ``sex``, ``keywords``. ODIR has no official split."""
    root = Path(root)
    sheet = find_sheet(root)
    if sheet is None:
        raise DatasetError(f"ODIR-5K: none of {list(SHEET_NAMES)} or full_df.csv found in {root} or {root}/ODIR-5K")
    if sheet.suffix == ".csv":
        frame = _from_kaggle(sheet)
        rows = frame.pop("_row").tolist()
    else:
        frame = read_sheet(sheet)
        rows = list(range(2, len(frame) + 2))
    require_columns(frame, [*SHEET_COLUMNS, *LABELS], sheet)
    ids = frame["ID"].fillna("").astype(str).str.strip().str.replace(r"\.0$", "", regex=True)
    for i, v in enumerate(ids):
        if not v:
            raise DatasetError(f"{sheet}: row {rows[i]} column 'ID': empty patient ID")
    dup = ids.duplicated(keep=False)
    if dup.any():
        where = [rows[i] for i in np.flatnonzero((ids == ids[dup].iloc[0]).to_numpy())[:6]]
        raise DatasetError(f"{sheet}: patient ID {ids[dup].iloc[0]!r} is listed more than once (rows {where}); "
                           "one row per patient expected")
    patient = parse_label_values(frame, LABELS, sheet, allowed=(1.0, 0.0), rows=rows)
    if np.isnan(patient).any():
        r, c = np.argwhere(np.isnan(patient))[0]
        raise DatasetError(f"{sheet}: row {rows[r]} column {LABELS[c]!r}: blank label; ODIR labels are 0 or 1")
    folder = _images_folder(sheet.parent)
    age = pd.to_numeric(frame["Patient Age"], errors="coerce")
    records, targets, origins = [], [], []
    for eye, side in (("left", "Left"), ("right", "Right")):
        names = frame[f"{side}-Fundus"].fillna("").astype(str).str.strip().tolist()
        paths = resolve_inside(root, folder, names, [(str(sheet), r) for r in rows], f"{side}-Fundus")
        for i, (path, cell) in enumerate(zip(paths, frame[f"{side}-Diagnostic Keywords"])):
            where = f"{sheet}: row {rows[i]} column '{side}-Diagnostic Keywords'"
            targets.append(eye_labels(split_keywords(cell), where))
            records.append({"path": path, "patient_id": ids.iloc[i], "case_id": ids.iloc[i], "eye": eye,
                            "age": age.iloc[i], "sex": frame["Patient Sex"].iloc[i],
                            "keywords": "; ".join(split_keywords(cell)), "view": None, "split": None,
                            "report": None})
            origins.append((str(sheet), rows[i]))
    order = np.argsort([int(r) for _, r in origins], kind="stable")  # patient by patient: left, right
    meta = pd.DataFrame(records).iloc[order].reset_index(drop=True)
    eye_targets = np.asarray(targets, dtype=np.float32)[order]
    return build_table("odir", root, LABELS, meta, eye_targets, citation=CITATION, prompt_names=PROMPT_NAMES,
                       check_files=check_files, source=str(sheet), origins=[origins[i] for i in order],
                       case_targets=(ids.tolist(), patient), notes={"default_unit": "case", "challenge": "odir"})


def register() -> None:
    """Register the ``odir`` format and its default preset (called by ``register_builtin_datasets``)."""
    register_dataset("odir", load_odir, is_odir, CITATION,
                     description="ODIR-5K fundus photographs: 8 labels per patient (both eyes: one case)",
                     files=(f"{SHEET_NAMES[0]} (or Kaggle's full_df.csv)", "Training Images/{ID}_left.jpg, "
                            "{ID}_right.jpg (or preprocessed_images/)"), preset="odir")
