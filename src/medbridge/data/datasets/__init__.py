"""One loader per dataset layout, registered by format name: ``load_dataset("nih", "/data/nih")``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..table import DatasetError, ImageTable
from .chexpert import load_chexpert, load_chexpert_plus
from .covid_chestxray import is_covid_chestxray, load_covid_chestxray
from .covidx import load_covidx
from .generic import load_csv, load_folder
from .mimic import load_mimic
from .nih import load_nih
from .odir import is_odir, load_odir
from .rsna import load_rsna

DATASET_FORMATS: dict[str, Callable[..., ImageTable]] = {
    "nih": load_nih,
    "mimic-cxr": load_mimic,
    "chexpert": load_chexpert,
    "chexpert-plus": load_chexpert_plus,
    "rsna": load_rsna,
    "covidx": load_covidx,
    "covid-chestxray": load_covid_chestxray,
    "odir": load_odir,
    "csv": load_csv,
    "folder": load_folder,
}


def detect_format(path: str | Path) -> str:
    """Guess the layout from the files present (the official file names of each dataset)."""
    p = Path(path)
    if p.is_file():
        return "csv"
    checks = [("nih", ["Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"]),
              ("mimic-cxr", ["mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.csv"]),
              ("chexpert-plus", ["df_chexpert_plus_240401.csv"]), ("chexpert", ["train.csv"]),
              ("rsna", ["stage_2_train_labels.csv"]), ("covidx", ["train.txt", "test.txt"])]
    for fmt, files in checks:
        if any((p / f).is_file() for f in files):
            return fmt
    if is_covid_chestxray(p):
        return "covid-chestxray"
    if is_odir(p):
        return "odir"
    if p.is_dir() and any(d.is_dir() for d in p.iterdir()):
        return "folder"
    raise DatasetError(f"cannot tell the dataset layout of {p}: pass a format ({', '.join(DATASET_FORMATS)})")


def load_dataset(format: str | None, path: str | Path, **options) -> ImageTable:
    """Load a dataset by format name (``None`` or ``"auto"``: detect from the files)."""
    fmt = detect_format(path) if format in (None, "auto") else format
    if fmt not in DATASET_FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}; choose one of {list(DATASET_FORMATS)}")
    if not Path(path).exists():
        raise DatasetError(f"{fmt}: dataset path {path} does not exist")
    try:
        return DATASET_FORMATS[fmt](path, **options)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise DatasetError(f"{fmt}: {exc}") from exc
        raise


__all__ = ["DATASET_FORMATS", "detect_format", "load_dataset", "load_nih", "load_mimic", "load_chexpert",
           "load_chexpert_plus", "load_rsna", "load_covidx", "load_covid_chestxray", "load_odir", "load_csv",
           "load_folder"]
