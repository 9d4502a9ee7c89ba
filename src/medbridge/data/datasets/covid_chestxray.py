"""COVID-19 Image Data Collection (Cohen et al. 2020) in the collection's own layout: ``metadata.csv`` + ``images/``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..table import (
    FRONTAL_VIEWS,
    LATERAL_VIEWS,
    DatasetError,
    ImageTable,
    build_table,
    read_csv,
    require_columns,
    resolve_inside,
)
from .registry import register_dataset

CITATION = ("Cohen J. P., Morrison P., Dao L., Roth K., Duong T. Q., Ghassemi M. COVID-19 Image Data Collection: "
            "Prospective Predictions Are the Future. arXiv:2006.11988 (2020). "
            "Data: https://github.com/ieee8023/covid-chestxray-dataset (per-image licences in metadata.csv).")
METADATA_FILE = "metadata.csv"
COLUMNS = ("patientid", "finding", "view", "filename")
#: The collection's finding hierarchy: finding -> its parent (None: top level). Upstream's newer path spelling
#: (``Pneumonia/Viral/COVID-19``) is this tree written out; a parent is positive whenever a child is.
PARENT: dict[str, str | None] = {
    "Pneumonia": None, "ARDS": None, "Tuberculosis": None, "No Finding": None,
    "Viral": "Pneumonia", "Bacterial": "Pneumonia", "Fungal": "Pneumonia", "Lipoid": "Pneumonia",
    "Aspiration": "Pneumonia",
    "COVID-19": "Viral", "SARS": "Viral", "MERS-CoV": "Viral", "MERS": "Viral", "Influenza": "Viral",
    "H1N1": "Influenza", "Varicella": "Viral", "Herpes": "Viral",
    "Streptococcus": "Bacterial", "Klebsiella": "Bacterial", "Mycoplasma": "Bacterial", "Legionella": "Bacterial",
    "E.Coli": "Bacterial", "Chlamydophila": "Bacterial", "Nocardia": "Bacterial", "Staphylococcus": "Bacterial",
    "MRSA": "Staphylococcus",
    "Pneumocystis": "Fungal", "Aspergillosis": "Fungal",
}
#: Other spellings of the June 2020 snapshot -> the hierarchy's name.
ALIASES = {"Mycoplasma Bacterial Pneumonia": "Mycoplasma", "E. Coli": "E.Coli", "E.coli": "E.Coli"}
#: Rows upstream marks as not yet labelled: left out (as torchxrayvision does), counted in ``notes``.
UNLABELLED = ("todo", "Unknown")
PROMPT_NAMES = {"Pneumonia": "pneumonia", "Viral": "viral pneumonia", "Bacterial": "bacterial pneumonia",
                "Fungal": "fungal pneumonia", "Lipoid": "lipoid pneumonia", "Aspiration": "aspiration pneumonia",
                "COVID-19": "covid-19 pneumonia", "ARDS": "acute respiratory distress syndrome",
                "No Finding": "no finding", "Tuberculosis": "tuberculosis"}
VIEWS = {"PA": "PA", "AP": "AP", "AP SUPINE": "AP", "AP ERECT": "AP", "L": "LATERAL", "LATERAL": "LATERAL"}


def ancestors(finding: str) -> list[str]:
    """The finding and its parents, most specific first: ``COVID-19`` -> [COVID-19, Viral, Pneumonia]."""
    chain = [finding]
    while PARENT[chain[-1]] is not None:
        chain.append(PARENT[chain[-1]])
    return chain


def finding_path(finding: str) -> str:
    """The collection's newer path spelling of a finding: ``COVID-19`` -> ``Pneumonia/Viral/COVID-19``."""
    return "/".join(reversed(ancestors(ALIASES.get(finding, finding))))


def parse_finding(cell: str, where: str) -> list[str]:
    """A ``finding`` cell -> its findings (hierarchy names). Comma-separated entries, each a name
    (``Streptococcus``) or a path (``Pneumonia/Bacterial/Streptococcus``) whose steps must follow the hierarchy."""
    out = []
    for entry in (e.strip() for e in cell.split(",")):
        if not entry:
            raise DatasetError(f"{where}: empty finding in {cell!r}")
        steps = [ALIASES.get(s.strip(), s.strip()) for s in entry.split("/")]
        for step in steps:
            if step not in PARENT:
                raise DatasetError(f"{where}: unknown finding {step!r} in {cell!r}; expected names from "
                                   f"{sorted(PARENT)} (comma-separated) or paths like Pneumonia/Viral/COVID-19")
        if len(steps) > 1 and ancestors(steps[-1])[::-1] != steps:
            raise DatasetError(f"{where}: path {entry!r} does not follow the hierarchy: {steps[-1]} is "
                               f"{finding_path(steps[-1])}")
        out.append(steps[-1])
    if "No Finding" in out and len(out) > 1:
        raise DatasetError(f"{where}: 'No Finding' combined with findings {out}")
    return out


def finding_targets(findings: list[list[str]], labels: list[str]) -> np.ndarray:
    """Per image: 1 for each finding and its ancestors; NaN for the sub-types of a finding given without one
    (``Pneumonia`` alone says nothing about viral vs bacterial); 0 otherwise."""
    col = {lab: j for j, lab in enumerate(labels)}
    out = np.zeros((len(findings), len(labels)), dtype=np.float32)
    for i, row in enumerate(findings):
        positive = {a for f in row for a in ancestors(f)}
        for f in row:
            if any(g != f and f in ancestors(g) for g in row):
                continue  # a more specific finding of this row says which sub-type
            for lab in labels:
                if lab != f and f in ancestors(lab) and lab not in positive:
                    out[i, col[lab]] = np.nan
        for lab in positive:
            out[i, col[lab]] = 1.0
    return out


def hierarchy_order(present: set[str]) -> list[str]:
    """The labels present plus their ancestors, depth-first in the order of ``PARENT``."""
    keep = {a for f in present for a in ancestors(f)}

    def walk(node: str) -> list[str]:
        return [node] + [x for c in PARENT if PARENT[c] == node and c in keep for x in walk(c)]

    return [x for top in PARENT if PARENT[top] is None and top in keep for x in walk(top)]


def parse_views(views) -> set[str]:
    """``"frontal"`` (default), ``"lateral"``, ``"all"``, or names (list or comma-separated: PA, AP, L/LATERAL)."""
    if isinstance(views, str):
        key = views.strip().lower()
        if key == "frontal":
            return set(FRONTAL_VIEWS)
        if key == "lateral":
            return set(LATERAL_VIEWS)
        if key == "all":
            return set(VIEWS.values())
        views = views.split(",")
    wanted = set()
    for v in views:
        name = VIEWS.get(str(v).strip().upper())
        if name is None:
            raise DatasetError(f"COVID-19 Image Data Collection: views={views!r}: {v!r} is not frontal, lateral, "
                               f"all or one of {sorted(set(VIEWS))}")
        wanted.add(name)
    return wanted


def is_covid_chestxray(root: str | Path) -> bool:
    """Whether ``root`` holds the collection's ``metadata.csv`` (checked by its header's columns)."""
    f = Path(root) / METADATA_FILE
    if not f.is_file():
        return False
    with open(f, encoding="utf-8", errors="replace") as fh:
        header = {c.strip().strip('"') for c in fh.readline().split(",")}
    return set(COLUMNS) <= header


def load_covid_chestxray(root: str | Path, *, views="frontal", labels=None, check_files: bool = True) -> ImageTable:
    """Load the COVID-19 Image Data Collection (github.com/ieee8023/covid-chestxray-dataset) from its folder.

    Expects ``metadata.csv`` (columns ``patientid``, ``finding``, ``view``, ``filename``; optional ``modality``,
    ``folder``, ``license``, ``clinical_notes``, ``offset``, ``sex``, ``age``, ``url``, ``doi``) and the images
    at ``<folder>/<filename>`` (``images/<filename>`` without a ``folder`` column). X-ray rows only (CT rows
    left out); rows whose finding is ``todo``/``Unknown`` left out (counted in ``table.notes``).

    Labels: the findings of the whole file with their hierarchy (Pneumonia > Viral > COVID-19, Bacterial >
    Streptococcus, Fungal > Pneumocystis, ...; ARDS, Tuberculosis and No Finding at the top); a parent is
    positive when a child is; sub-types of a finding given alone (``Pneumonia``, ``Bacterial``) are unknown
    (NaN). Both spellings are read: comma-separated names (``COVID-19, ARDS``) and paths
    (``Pneumonia/Viral/COVID-19``). ``views``: ``"frontal"`` (default: PA, AP, AP Supine, AP Erect),
    ``"lateral"`` (``L``), ``"all"`` or a list. ``labels``: keep only these labels (e.g. ``["COVID-19"]``: the
    COVIDx-style COVID-19 vs other findings task; images unknown for every kept label stay, masked). Reports:
    ``clinical_notes``. The per-image ``license`` is kept in ``meta`` and written into prediction files.
    No official split: patient-disjoint splits by ``patientid``."""
    root = Path(root)
    csv = root / METADATA_FILE
    if not csv.is_file():
        raise DatasetError(f"COVID-19 Image Data Collection: expected {csv} not found")
    frame = read_csv(csv, "COVID-19 Image Data Collection", dtype=str, keep_default_na=False)
    frame.columns = [str(c).strip() for c in frame.columns]
    require_columns(frame, COLUMNS, csv)
    frame.index = frame.index + 2  # CSV row numbers, the header being row 1
    for col in COLUMNS:
        frame[col] = frame[col].str.strip()
    if "modality" in frame.columns:
        frame = frame[frame["modality"].str.strip().str.upper().isin(["X-RAY", "XRAY", "CXR", ""])]
    unlabelled = frame["finding"].isin(UNLABELLED)
    frame = frame[~unlabelled]
    for col in ("patientid", "finding", "filename"):
        empty = frame[col] == ""
        if empty.any():
            raise DatasetError(f"{csv}: row {empty.idxmax()} column {col!r}: empty value")
    repeated = frame["filename"].duplicated()  # upstream lists a few images under two patient ids
    for row in frame.index[repeated]:
        first = frame.index[(frame["filename"] == frame["filename"][row]).to_numpy()][0]
        if frame["finding"][row] != frame["finding"][first] or frame["view"][row] != frame["view"][first]:
            raise DatasetError(f"{csv}: rows {first} and {row} list image {frame['filename'][row]!r} with different "
                               "findings or views; keep one row per image")
    frame = frame[~repeated]
    raw_views = frame["view"].str.upper()
    unknown = ~raw_views.isin(VIEWS)
    if unknown.any():
        row = unknown.idxmax()
        raise DatasetError(f"{csv}: row {row} column 'view': {frame['view'][row]!r} is not an X-ray view "
                           f"({sorted(set(VIEWS))})")
    findings = [parse_finding(cell, f"{csv}: row {row} column 'finding'") for row, cell in frame["finding"].items()]
    vocabulary = hierarchy_order({f for row in findings for f in row})
    wanted = [x.strip() for x in labels.split(",")] if isinstance(labels, str) else list(labels or vocabulary)
    missing = [x for x in wanted if x not in vocabulary]
    if missing or not wanted:
        raise DatasetError(f"{csv}: labels={labels!r}: {missing or 'none'} not among this file's labels {vocabulary}")
    view = raw_views.map(VIEWS)
    keep = view.isin(parse_views(views)).to_numpy()
    folder = frame["folder"].str.strip().replace("", "images") if "folder" in frame.columns else "images"
    origins = [(str(csv), int(row)) for row in frame.index]
    names = [f"{d}/{f}" for d, f in zip(pd.Series(folder, index=frame.index), frame["filename"])]
    meta = pd.DataFrame({
        "path": resolve_inside(root, root, names, origins, "filename"),
        "patient_id": frame["patientid"], "view": view, "split": None,
        "report": frame["clinical_notes"].str.strip().replace("", None) if "clinical_notes" in frame else None,
        "view_raw": frame["view"], "finding": frame["finding"], "csv_row": frame.index,
        "license": frame["license"].str.strip() if "license" in frame else None,
    })
    for col in ("offset", "sex", "age", "url", "doi"):
        if col in frame.columns:
            meta[col] = pd.to_numeric(frame[col], errors="coerce") if col in ("offset", "age") else frame[col]
    targets = finding_targets(findings, vocabulary)[:, [vocabulary.index(x) for x in wanted]]
    meta, targets, labels = meta[keep], targets[keep], wanted
    origins = [o for o, k in zip(origins, keep) if k]
    if len(meta) == 0:
        raise DatasetError(f"{csv}: no images left after keeping views {views!r} (views present: "
                           f"{sorted(frame['view'].unique())})")
    notes = {"left_out_unlabelled": int(unlabelled.sum()), "left_out_repeated_images": int(repeated.sum()),
             "left_out_views": int((~keep).sum()),
             "prediction_columns": ("license",) if "license" in frame.columns else ()}
    return build_table("covid-chestxray", root, labels, meta, targets, citation=CITATION,
                       prompt_names=[PROMPT_NAMES.get(lab, f"{lab.lower()} pneumonia") for lab in labels],
                       notes=notes, check_files=check_files, source=str(csv), origins=origins)


def register() -> None:
    """Register the ``covid-chestxray`` format (called by ``register_builtin_datasets``)."""
    register_dataset("covid-chestxray", load_covid_chestxray, is_covid_chestxray, CITATION,
                     description="COVID-19 Image Data Collection: finding hierarchy (16 labels), patient split",
                     files=(f"{METADATA_FILE} (columns {', '.join(COLUMNS)})", "images/"))



__all__ = ["CITATION", "PARENT", "load_covid_chestxray", "is_covid_chestxray", "finding_path", "ancestors",
           "register"]
