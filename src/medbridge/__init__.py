"""medbridge: adapt frozen foundation vision(-language) models to multi-label medical image classification."""

from .backbones import (
    DEFAULT_BACKBONE,
    Backbone,
    BackboneError,
    PreprocessConfig,
    TextTower,
    VisionTower,
    create_backbone,
    create_text_tower,
    list_backbones,
    register_backbone,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BACKBONE", "Backbone", "BackboneError", "PreprocessConfig", "TextTower", "VisionTower",
    "create_backbone", "create_text_tower", "list_backbones", "register_backbone", "__version__",
]
