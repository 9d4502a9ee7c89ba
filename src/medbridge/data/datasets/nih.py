"""NIH ChestX-ray14 (Wang et al., CVPR 2017) in its official download layout."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..images import IMAGE_SUFFIXES
from ..labels import NIH_LABELS
from ..table import (
    DatasetError,
    ImageTable,
    build_table,
    csv_origins,
    read_csv,
    read_text,
    require_columns,
    resolve_inside,
)
from .registry import has_any_file, register_dataset

CITATION = ("Wang X. et al. ChestX-ray8: Hospital-scale chest X-ray database and benchmarks on weakly-supervised "
            "classification and localization of common thorax diseases. CVPR 2017. Data: NIH Clinical Center.")
ENTRY_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
COLUMNS = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
           "View Position")


def image_index(root: Path) -> dict[str, Path]:
    """File name -> path for every image below ``root`` (images_001/, images_001/images/ (Kaggle), images/ ...)."""
    index: dict[str, Path] = {}
    for folder, _, files in os.walk(root):
        for f in files:
            if Path(f).suffix.lower() in IMAGE_SUFFIXES:
                index.setdefault(f, Path(folder) / f)
    return index


def _read_list(path: Path) -> set[str]:
    return {line.strip() for line in read_text(path, "NIH ChestX-ray14 split list").splitlines() if line.strip()}


def load_nih(root: str | Path, *, include_no_finding: bool = False, check_files: bool = True) -> ImageTable:
    """Load NIH ChestX-ray14 from the folder of the official download.

    Expects ``Data_Entry_2017_v2020.csv`` or ``Data_Entry_2017.csv`` (header quirk: the last two column names
    contain commas, handled) and the images anywhere below ``root`` (``images_0XX/`` or Kaggle's
    ``images_0XX/images/``), found by file name. ``train_val_list.txt`` / ``test_list.txt`` give the official
    patient-disjoint split when present (NIH defines no validation split: carve it from train by patient).
    Labels: the 14 findings; "No Finding" means all 14 negative (added as a 15th label with
    ``include_no_finding``). NIH labels are all known (no NaN)."""
    root = Path(root)
    csv = next((root / f for f in ENTRY_FILES if (root / f).is_file()), None)
    if csv is None:
        raise DatasetError(f"NIH ChestX-ray14: none of {list(ENTRY_FILES)} found in {root}")
    frame = read_csv(csv, "NIH ChestX-ray14", dtype=str, keep_default_na=False)
    require_columns(frame, COLUMNS, csv)
    tokens = frame["Finding Labels"].str.split("|")
    vocab = set(NIH_LABELS) | {"No Finding"}
    for i, toks in enumerate(tokens):
        bad = [t for t in toks if t not in vocab]
        if bad:
            raise DatasetError(f"{csv}: row {i + 2} column 'Finding Labels': unknown finding {bad[0]!r}; expected "
                               f"'|'-separated names from {sorted(vocab)}")
        if "No Finding" in toks and len(toks) > 1:
            raise DatasetError(f"{csv}: row {i + 2}: 'No Finding' combined with findings {toks}")
    labels = list(NIH_LABELS) + (["No Finding"] if include_no_finding else [])
    targets = np.array([[float(lab in toks) for lab in labels] for toks in tokens], dtype=np.float32)
    index = image_index(root)
    names = frame["Image Index"].str.strip()
    origins = csv_origins(csv, len(frame))
    inside = resolve_inside(root, root / "images", names, origins, "Image Index")  # refuses ../ and /abs names
    paths = [str(index[n]) if n in index else p for n, p in zip(names, inside)]
    split = pd.Series([None] * len(frame), dtype=object)
    lists = {"train": root / "train_val_list.txt", "test": root / "test_list.txt"}
    if all(p.is_file() for p in lists.values()):
        train, test = _read_list(lists["train"]), _read_list(lists["test"])
        split = names.map(lambda n: "train" if n in train else ("test" if n in test else None))
    age = pd.to_numeric(frame["Patient Age"].str.rstrip("Yy"), errors="coerce")
    meta = pd.DataFrame({"path": paths, "patient_id": frame["Patient ID"].str.strip(),
                         "view": frame["View Position"].str.strip().str.upper(), "split": split, "report": None,
                         "image_index": names, "follow_up": frame["Follow-up #"], "age": age,
                         "sex": frame["Patient Gender"]})
    return build_table("nih", root, labels, meta, targets, citation=CITATION, check_files=check_files,
                       source=str(csv), origins=origins)


def register() -> None:
    """Register the ``nih`` format (called by ``register_builtin_datasets``)."""
    register_dataset("nih", load_nih, has_any_file(*ENTRY_FILES), CITATION,
                     description="NIH ChestX-ray14: 14 findings, official train/test lists",
                     files=(" or ".join(ENTRY_FILES), "images_0XX/*.png", "train_val_list.txt + test_list.txt "
                            "(optional)"))
