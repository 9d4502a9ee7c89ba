"""Label prompts through a frozen text tower, then a learnable projection to the image embedding width."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...backbones.base import TextTower

DEFAULT_TEMPLATE = "a radiology image with {}."


def readable_name(label: str) -> str:
    """'Pleural_Thickening' -> 'pleural thickening' (datasets can give better names)."""
    return label.replace("_", " ").strip().lower()


class LabelTextHead(nn.Module):
    """Prompts -> frozen text tower (pooled the tower's way, before its own projection) -> learnable Linear.

    The Linear starts from the model's own text projection when it has one of the right shape (a CLIP then
    starts at its zero-shot alignment), else from the identity when widths match, else a default init. Frozen
    text features are cached per prompt list: they only change through the projection."""

    def __init__(self, text: TextTower, out_dim: int, template: str = DEFAULT_TEMPLATE) -> None:
        super().__init__()
        if "{}" not in template:
            raise ValueError(f"prompt template must contain '{{}}' for the class name, got {template!r}")
        self.text = text
        self.template = template
        self.proj = nn.Linear(text.width, out_dim)
        own = text.projection_weight()
        with torch.no_grad():
            if own is not None and tuple(own[0].shape) == (out_dim, text.width):
                self.proj.weight.copy_(own[0])
                self.proj.bias.copy_(own[1] if own[1] is not None else torch.zeros(out_dim))
                self.init = "model text projection"
            elif text.width == out_dim:
                self.proj.weight.copy_(torch.eye(out_dim))
                self.proj.bias.zero_()
                self.init = "identity"
            else:
                self.init = "random"
        self._cache: dict[tuple[str, ...], Tensor] = {}

    def prompts(self, names: list[str]) -> list[str]:
        return [self.template.format(n) for n in names]

    def frozen_features(self, texts: list[str]) -> Tensor:
        """Pooled frozen features [len(texts), width]; cached for label prompts."""
        key = tuple(texts)
        device = self.proj.weight.device
        if key not in self._cache or self._cache[key].device != device:  # re-encode after .to(device)
            with torch.no_grad():
                self._cache[key] = self.text.encode_text(list(texts)).pooled.detach().to(device)
        return self._cache[key]

    def encode_uncached(self, texts: list[str]) -> Tensor:
        """Projected features of free text (e.g. reports), not cached."""
        with torch.no_grad():
            pooled = self.text.encode_text(list(texts)).pooled
        return self.proj(pooled)

    def forward(self, names: list[str]) -> Tensor:
        """Readable class names -> projected label embeddings [L, out_dim]."""
        if not names:
            raise ValueError("the label list is empty")
        return self.proj(self.frozen_features(self.prompts(names)))
