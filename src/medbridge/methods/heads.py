"""Multi-label logits from image/text cosine similarity, and the masked BCE loss shared by all methods."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOGIT_FORMS = ("cosine", "scaled")


class CosineLogits(nn.Module):
    """``cosine``: logits = cos(v, z_l) (paper-literal; sigmoid then lies in [0.27, 0.73]).
    ``scaled``: logits = s * cos(v, z_l) + b_l with learnable temperature s (init ``init_scale``) and per-class bias
    b_l (init 0), as SigLIP does: calibrates probabilities without changing the ranking at init.

    Biases are stored per label name, so another label set at inference reuses known biases and gives unseen
    labels the mean bias (no retraining)."""

    def __init__(self, labels: list[str], form: str = "scaled", init_scale: float = 10.0) -> None:
        super().__init__()
        if form not in LOGIT_FORMS:
            raise ValueError(f"logit form must be one of {LOGIT_FORMS}, got {form!r}")
        self.form = form
        self.labels = list(labels)
        if form == "scaled":
            self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
            self.bias = nn.Parameter(torch.zeros(len(labels)))

    def biases_for(self, labels: list[str]) -> Tensor:
        if labels == self.labels:
            return self.bias
        index = {name: i for i, name in enumerate(self.labels)}
        mean = self.bias.mean()
        return torch.stack([self.bias[index[n]] if n in index else mean for n in labels])

    def forward(self, image: Tensor, text: Tensor, labels: list[str] | None = None) -> Tensor:
        cos = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
        if self.form == "cosine":
            return cos
        return self.log_scale.exp() * cos + self.biases_for(labels or self.labels)


def masked_bce(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean BCE-with-logits over known entries. NaN targets are unknown (masked out), as is ``mask == 0``."""
    known = ~torch.isnan(targets)
    if mask is not None:
        known = known & (mask > 0)
    safe = torch.where(known, targets, torch.zeros_like(targets))
    loss = F.binary_cross_entropy_with_logits(logits, safe, reduction="none")
    n = known.sum()
    return (loss * known).sum() / n.clamp(min=1)
