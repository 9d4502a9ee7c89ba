"""Names and paths the command line needs before anything heavy (torch, pandas) is imported."""

from __future__ import annotations

from pathlib import Path

DEFAULT_BACKBONE = "dinov2-small+minilm-l6"
CACHE_MODES = ("auto", "full", "prefix", "pooled", "pixels", "none")  # train.cache (engine/features.py)
PRESET_DIR = Path(__file__).resolve().parent / "presets"


def list_presets() -> list[str]:
    """The preset names shipped in ``medbridge/presets`` (without ``.yaml``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


__all__ = ["CACHE_MODES", "DEFAULT_BACKBONE", "PRESET_DIR", "list_presets"]
