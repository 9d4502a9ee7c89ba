"""medbridge: adapt frozen foundation vision(-language) models to multi-label medical image classification.

The public names below are imported on first use (``import medbridge`` itself does not import torch), so that the
command line starts quickly."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

_LAZY = {
    **dict.fromkeys(["Backbone", "BackboneError", "BackboneFamily", "BackboneSpec", "PreprocessConfig", "TextTower",
                     "VisionTower", "create_backbone", "create_text_tower", "list_backbones", "register_backbone",
                     "register_backbone_family"], "medbridge.backbones"),
    **dict.fromkeys(["Method", "create_method", "list_methods", "load_method", "register_method", "save_method"],
                    "medbridge.methods"),
    **dict.fromkeys(["DatasetSpec", "list_datasets", "load_dataset", "register_dataset"], "medbridge.data.datasets"),
    "DEFAULT_BACKBONE": "medbridge.defaults",
}

if TYPE_CHECKING:  # pragma: no cover
    from .backbones import (
        Backbone,
        BackboneError,
        BackboneFamily,
        BackboneSpec,
        PreprocessConfig,
        TextTower,
        VisionTower,
        create_backbone,
        create_text_tower,
        list_backbones,
        register_backbone,
        register_backbone_family,
    )
    from .data.datasets import DatasetSpec, list_datasets, load_dataset, register_dataset
    from .defaults import DEFAULT_BACKBONE
    from .methods import Method, create_method, list_methods, load_method, register_method, save_method


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'medbridge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "DEFAULT_BACKBONE", "Backbone", "BackboneError", "BackboneFamily", "BackboneSpec", "PreprocessConfig", "TextTower",
    "VisionTower", "create_backbone", "create_text_tower", "list_backbones", "register_backbone",
    "register_backbone_family", "__version__",
    "Method", "create_method", "list_methods", "load_method", "register_method", "save_method",
    "DatasetSpec", "list_datasets", "load_dataset", "register_dataset",
]
