"""Names and paths the command line needs before anything heavy (torch, pandas) is imported."""

from __future__ import annotations

from pathlib import Path

DEFAULT_BACKBONE = "dinov2-small+minilm-l6"
CACHE_MODES = ("auto", "full", "prefix", "pooled", "pixels", "none")  # train.cache (engine/features.py)
PRESET_DIR = Path(__file__).resolve().parent / "presets"


def is_study_file(path: Path) -> bool:
    """Whether a YAML file is an ablation study (a top-level ``studies:`` key), not a run preset."""
    return any(line.startswith("studies:") for line in path.read_text().splitlines())


def list_presets() -> list[str]:
    """The run preset names shipped in ``medbridge/presets`` (without ``.yaml``; study files left out)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not is_study_file(p))


def list_studies() -> list[str]:
    """The ablation study names shipped in ``medbridge/presets`` (``medbridge ablate --study NAME``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if is_study_file(p))


__all__ = ["CACHE_MODES", "DEFAULT_BACKBONE", "PRESET_DIR", "is_study_file", "list_presets", "list_studies"]
