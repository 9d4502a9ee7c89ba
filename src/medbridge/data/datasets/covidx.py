"""COVIDx CXR-4 (Wu et al. 2023; COVID-Net, Wang et al. 2020)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..table import DatasetError, ImageTable, build_table, read_text, resolve_inside
from .registry import has_any_file, register_dataset

CITATION = ("Wu Y. et al. COVIDx CXR-4: an expanded multi-institutional open-source benchmark dataset for chest "
            "X-ray image-based computer-aided COVID-19 diagnostics. arXiv:2311.17677 (2023).")
LABELS = ("COVID-19",)
CLASSES = {"positive": 1.0, "negative": 0.0}


def load_covidx(root: str | Path, *, check_files: bool = True) -> ImageTable:
    """Load COVIDx CXR-4: label files ``train.txt`` ``val.txt`` ``test.txt`` (space-separated
    ``patient_id filename class data_source``, no header; class positive/negative) and image folders
    ``train/`` ``val/`` ``test/``. One label, "COVID-19". The official split is kept. Sources include RSNA and
    NIH images: beware of cross-dataset leakage."""
    root = Path(root)
    rows, paths, origins = [], [], []
    found = False
    for split in ("train", "val", "test"):
        f = root / f"{split}.txt"
        if not f.is_file():
            continue
        found = True
        names, lines = [], []
        for n, line in enumerate(read_text(f, "COVIDx").split("\n"), start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) < 3:
                raise DatasetError(f"{f}: line {n}: expected 'patient_id filename class data_source', got {line!r}")
            if parts[2].lower() not in CLASSES:
                raise DatasetError(f"{f}: line {n}: class {parts[2]!r} is not one of {list(CLASSES)}")
            names.append(parts[1])
            lines.append((str(f), n))
            rows.append({"patient_id": parts[0], "split": split, "target": CLASSES[parts[2].lower()],
                         "source": parts[3] if len(parts) > 3 else None})
        paths += resolve_inside(root, root / split, names, lines, "filename")
        origins += lines
    if not found:
        raise DatasetError(f"COVIDx: none of train.txt / val.txt / test.txt found in {root}")
    meta = pd.DataFrame(rows, columns=["patient_id", "split", "target", "source"])
    meta["path"] = paths
    meta["view"] = None
    meta["report"] = None
    return build_table("covidx", root, LABELS, meta.drop(columns="target"), meta[["target"]].to_numpy(),
                       citation=CITATION, check_files=check_files, source=str(root / "train.txt"), origins=origins)


def register() -> None:
    """Register the ``covidx`` format (called by ``register_builtin_datasets``)."""
    register_dataset("covidx", load_covidx, has_any_file("train.txt", "test.txt"), CITATION,
                     description="COVIDx CXR-4: COVID-19, official train/val/test",
                     files=("train.txt", "val.txt", "test.txt", "train/", "val/", "test/"))
