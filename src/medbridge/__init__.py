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

from .methods import (  # noqa: E402  (after __version__, which saved methods record)
    Method,
    create_method,
    list_methods,
    load_method,
    register_method,
    save_method,
)

__all__ = [
    "DEFAULT_BACKBONE", "Backbone", "BackboneError", "PreprocessConfig", "TextTower", "VisionTower",
    "create_backbone", "create_text_tower", "list_backbones", "register_backbone", "__version__",
    "Method", "create_method", "list_methods", "load_method", "register_method", "save_method",
]
