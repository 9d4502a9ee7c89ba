"""Frozen backbones behind one interface (vision blocks one at a time, text pooled the model's way)."""

from .base import Backbone, PreprocessConfig, TextFeatures, TextTokens, TextTower, TokenBlock, VisionTower
from .loading import BackboneError, HubUnreachableError, read_state_dict
from .registry import (
    DEFAULT_BACKBONE,
    BackboneFamily,
    BackboneSpec,
    ModelFiles,
    availability,
    create_backbone,
    create_text_tower,
    get_family,
    get_spec,
    list_backbone_families,
    list_backbones,
    register_backbone,
    register_backbone_family,
    tiny_builders,
)
from .source import Source, parse_source

__all__ = [
    "Backbone", "PreprocessConfig", "TextFeatures", "TextTokens", "TextTower", "TokenBlock", "VisionTower",
    "BackboneError", "HubUnreachableError", "read_state_dict", "DEFAULT_BACKBONE", "BackboneFamily", "BackboneSpec",
    "ModelFiles", "Source", "availability", "create_backbone", "create_text_tower", "get_family", "get_spec",
    "list_backbone_families", "list_backbones", "parse_source", "register_backbone", "register_backbone_family",
    "tiny_builders",
]
