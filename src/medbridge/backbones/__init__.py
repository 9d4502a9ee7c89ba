"""Frozen backbones behind one interface (vision blocks one at a time, text pooled the model's way)."""

from .base import Backbone, PreprocessConfig, TextFeatures, TextTokens, TextTower, TokenBlock, VisionTower
from .loading import BackboneError, HubUnreachableError, read_state_dict
from .registry import (
    DEFAULT_BACKBONE,
    BackboneSpec,
    availability,
    create_backbone,
    create_text_tower,
    get_spec,
    list_backbones,
    register_backbone,
    tiny_builders,
)

__all__ = [
    "Backbone", "PreprocessConfig", "TextFeatures", "TextTokens", "TextTower", "TokenBlock", "VisionTower",
    "BackboneError", "HubUnreachableError", "read_state_dict", "DEFAULT_BACKBONE", "BackboneSpec", "availability",
    "create_backbone", "create_text_tower", "get_spec", "list_backbones", "register_backbone", "tiny_builders",
]
