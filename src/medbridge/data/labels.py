"""Label vocabularies, readable prompt names, the uncertainty policy and cross-dataset label alignment."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHEXPERT_LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
)
NIH_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
    "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
)

#: Readable names used in prompts ("a radiology image with {}."): what a radiologist would write.
PROMPT_NAMES = {
    "No Finding": "no finding",
    "Enlarged Cardiomediastinum": "enlarged cardiomediastinum",
    "Cardiomegaly": "cardiomegaly",
    "Lung Opacity": "lung opacity",
    "Lung Lesion": "lung lesion",
    "Edema": "pulmonary edema",
    "Consolidation": "consolidation",
    "Pneumonia": "pneumonia",
    "Atelectasis": "atelectasis",
    "Pneumothorax": "pneumothorax",
    "Pleural Effusion": "pleural effusion",
    "Effusion": "pleural effusion",
    "Pleural Other": "other pleural abnormality",
    "Fracture": "fracture",
    "Support Devices": "support devices",
    "Emphysema": "emphysema",
    "Fibrosis": "pulmonary fibrosis",
    "Hernia": "hiatal hernia",
    "Infiltration": "infiltration",
    "Mass": "lung mass",
    "Nodule": "lung nodule",
    "Pleural_Thickening": "pleural thickening",
    "COVID-19": "covid-19 pneumonia",
}

#: Same finding, different spelling: each group maps to one canonical name (the CheXpert spelling).
SYNONYMS = {"Effusion": "Pleural Effusion", "Airspace Opacity": "Lung Opacity",
            "Pleural Thickening": "Pleural_Thickening"}
#: Approximate correspondences (opt-in, ``approximate=True``): NIH label -> CheXpert label it falls under.
APPROXIMATE = {"Nodule": "Lung Lesion", "Mass": "Lung Lesion", "Infiltration": "Lung Opacity",
               "Pleural_Thickening": "Pleural Other"}

UNCERTAIN_POLICIES = ("ignore", "ones", "zeros")
BLANK_POLICIES = ("zeros", "ignore")


def prompt_name(label: str) -> str:
    """Readable name for a label: the table above, else 'Pleural_Thickening' -> 'pleural thickening'."""
    return PROMPT_NAMES.get(label, label.replace("_", " ").strip().lower())


def canonical(label: str) -> str:
    return SYNONYMS.get(label, label)


def apply_uncertainty(values: np.ndarray, uncertain: str = "ignore", blank: str = "zeros") -> np.ndarray:
    """Map raw label values (1, 0, -1, NaN=blank) to training targets with NaN = unknown.

    ``uncertain`` (-1): "ignore" -> NaN (masked out of the loss, the U-Ignore policy), "ones", "zeros".
    ``blank`` (finding not mentioned): "zeros" (the usual reading of a CheXpert/MIMIC labeler) or "ignore" -> NaN.
    Returns a new float32 array."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain policy must be one of {UNCERTAIN_POLICIES}, got {uncertain!r}")
    if blank not in BLANK_POLICIES:
        raise ValueError(f"blank policy must be one of {BLANK_POLICIES}, got {blank!r}")
    out = np.array(values, dtype=np.float32, copy=True)
    unc = out == -1
    out[unc] = {"ignore": np.nan, "ones": 1.0, "zeros": 0.0}[uncertain]
    if blank == "zeros":
        out[np.isnan(out) & ~unc] = 0.0
    return out


@dataclass(frozen=True)
class Alignment:
    """How a dataset's labels map onto a target label list: each target label takes the values of zero, one or
    (approximate mode: e.g. Nodule + Mass -> Lung Lesion) several source labels."""

    target: tuple[str, ...]
    sources: dict  # target label -> tuple of source labels (empty: no counterpart, all NaN)
    dropped: tuple[str, ...]  # source labels with no place in the target list

    @property
    def missing(self) -> list[str]:
        return [t for t, s in self.sources.items() if not s]

    def summary(self) -> str:
        mapped = [f"{t}<-{'+'.join(s)}" for t, s in self.sources.items() if s and s != (t,)]
        parts = [f"{len(self.target) - len(self.missing)}/{len(self.target)} target labels have a counterpart"]
        if mapped:
            parts.append("renamed: " + ", ".join(mapped))
        if self.missing:
            parts.append("no counterpart (NaN, skipped by metrics): " + ", ".join(self.missing))
        if self.dropped:
            parts.append("source labels unused: " + ", ".join(self.dropped))
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"target": list(self.target), "sources": {t: list(s) for t, s in self.sources.items()},
                "missing": self.missing, "dropped": list(self.dropped)}


def align_label_names(source: list[str] | tuple[str, ...], target: list[str] | tuple[str, ...],
                      approximate: bool = False) -> Alignment:
    """Match each target label to source labels: same name, else same canonical name (synonyms), else (opt-in)
    every source label whose approximate counterpart it is."""
    sources = {}
    for t in target:
        exact = [s for s in source if s == t] or [s for s in source if canonical(s) == canonical(t)]
        if not exact and approximate:
            exact = [s for s in source if APPROXIMATE.get(s) == canonical(t)]
        sources[t] = tuple(exact[:1] if exact and exact[0] == t else exact)
    used = {s for group in sources.values() for s in group}
    return Alignment(tuple(target), sources, tuple(s for s in source if s not in used))


def align_targets(targets: np.ndarray, source: list[str] | tuple[str, ...], alignment: Alignment) -> np.ndarray:
    """Re-index a [N, len(source)] target array onto ``alignment.target`` (a new array). A target with several
    sources is positive if any is, negative if all known ones are negative, NaN if all are unknown."""
    source = list(source)
    out = np.full((targets.shape[0], len(alignment.target)), np.nan, dtype=np.float32)
    for j, t in enumerate(alignment.target):
        cols = [source.index(s) for s in alignment.sources[t]]
        if cols:
            block = targets[:, cols]
            known = ~np.isnan(block)
            out[:, j] = np.where(known.any(axis=1), np.where(known, block, -np.inf).max(axis=1), np.nan)
    return out
