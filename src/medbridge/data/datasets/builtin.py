"""The dataset formats that ship with medbridge, registered explicitly (called once by the registry on first use).

Registration order is the order of ``medbridge list datasets`` and, among equal priorities, of detection."""

from __future__ import annotations


def register_builtin_datasets() -> None:
    from . import chexpert, covid_chestxray, covidx, generic, mimic, nih, odir, rsna

    for module in (nih, mimic, chexpert, rsna, covidx, covid_chestxray, odir, generic):
        module.register()
