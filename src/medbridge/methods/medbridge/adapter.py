"""Building a MedBridge model from its config (saving and loading go through ``methods/registry.py``)."""

from __future__ import annotations

from ...backbones import Backbone, create_backbone, create_text_tower
from .model import MedBridgeConfig, MedBridgeModel


def build_medbridge(config: MedBridgeConfig, backbones: list[Backbone] | None = None) -> MedBridgeModel:
    """Create (or reuse) the frozen backbones named by the config and build the model around them."""
    backbones = backbones or [create_backbone(s) for s in config.backbones]
    text = None if isinstance(config.text_source, int) else create_text_tower(config.text_source)
    return MedBridgeModel(config, backbones, text)
