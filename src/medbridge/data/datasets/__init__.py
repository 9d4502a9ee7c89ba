"""One loader per dataset layout, registered by format name: ``load_dataset("nih", "/data/nih")``.

The registry (``registry.py``) holds each format's loader, detector, citation, expected files and default preset;
``medbridge list datasets`` prints it; ``docs/adding-a-dataset.md`` adds a format of your own."""

from __future__ import annotations

from .chexpert import load_chexpert, load_chexpert_plus
from .covid_chestxray import load_covid_chestxray
from .covidx import load_covidx
from .generic import load_csv, load_folder
from .mimic import load_mimic
from .nih import load_nih
from .odir import load_odir
from .registry import (
    DatasetSpec,
    detect_format,
    get_dataset,
    list_datasets,
    load_dataset,
    register_dataset,
)
from .rsna import load_rsna

__all__ = ["DatasetSpec", "detect_format", "get_dataset", "list_datasets", "load_dataset", "register_dataset",
           "load_nih", "load_mimic", "load_chexpert", "load_chexpert_plus", "load_rsna", "load_covidx",
           "load_covid_chestxray", "load_odir", "load_csv", "load_folder"]
