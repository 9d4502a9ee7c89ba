"""Zero-shot CLIP with the multi-label head (no training): z = s cos(f, w^zs) + b0."""

from __future__ import annotations

from torch import Tensor

from ...backbones.base import Backbone
from ..prompts import DEFAULT_TEMPLATE
from .base import ClipHead, FeatureMethod, backbone_scale, require_aligned_text, zero_shot_text


class ZeroShot(FeatureMethod):
    name = "zero-shot"
    seed_dependent = False  # nothing trained

    def __init__(self, backbone: Backbone, labels, names, template: str = DEFAULT_TEMPLATE) -> None:
        super().__init__(backbone, labels, names, template)
        text = require_aligned_text(backbone, self.name)
        self.register_buffer("text_features", zero_shot_text(text, self.names, template))
        self.head = ClipHead(len(labels), backbone_scale(backbone), train_bias=False)

    def init_from_features(self, features: Tensor) -> None:
        self.head.init_bias(features, self.text_features)

    def forward(self, features: Tensor) -> Tensor:
        return self.head(features, self.text_features)
