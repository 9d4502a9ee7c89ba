"""What every baseline shares: the multi-label CLIP head, zero-shot text features, the feature-space interface.

``NotApplicableError`` (from ``methods.api``) is re-exported here for the baselines."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...backbones.base import Backbone, TextTower
from ..api import NonFiniteLoss, NotApplicableError
from ..heads import masked_bce
from ..prompts import DEFAULT_TEMPLATE

DEFAULT_SCALE = 1 / 0.07  # CLIP's initial temperature; used when a backbone has no logit scale of its own




def require_aligned_text(backbone: Backbone, method: str) -> TextTower:
    if backbone.text is None or not backbone.aligned:
        why = "has no text tower" if backbone.text is None else "has a text tower not trained with its image tower"
        raise NotApplicableError(f"{method} needs a CLIP-style backbone whose text tower was trained with its image "
                                 f"tower (zero-shot alignment); {backbone.name} {why}. Use linear-probe or "
                                 "medbridge on this backbone, or a CLIP/SigLIP/CheXzero backbone.")
    return backbone.text


@dataclass
class Hparams:
    """Optimisation settings of a feature-space method (defaults from specs/baselines.md per method)."""

    optimizer: str = "sgd"  # sgd (momentum 0.9) or adamw
    lr: float = 0.002
    weight_decay: float = 5e-4
    epochs: int = 50
    batch_size: int = 32
    warmup_epochs: int = 1  # constant warmup at 1e-5 (Dassl), then cosine
    extra: dict = field(default_factory=dict)


class ClipHead(nn.Module):
    """z_ij = s * cos(f_i, w_j) + b_j with the backbone's frozen temperature s and a per-class bias b (trainable
    unless ``train_bias=False``), label-free init b_j = -s * mean_i cos(f_i, w_j^zs) (:meth:`init_bias`)."""

    def __init__(self, num_labels: int, scale: float, train_bias: bool = True) -> None:
        super().__init__()
        self.scale = float(scale)
        self.bias = nn.Parameter(torch.zeros(num_labels), requires_grad=train_bias)

    def cosine(self, features: Tensor, text: Tensor) -> Tensor:
        f = F.normalize(features, dim=-1)
        w = F.normalize(text, dim=-1)
        return f @ w.T if w.ndim == 2 else torch.einsum("bd,bld->bl", f, w)

    def forward(self, features: Tensor, text: Tensor) -> Tensor:
        return self.scale * self.cosine(features, text) + self.bias

    @torch.no_grad()
    def init_bias(self, features: Tensor, text: Tensor) -> None:
        self.bias.copy_(-self.scale * self.cosine(features, text).mean(0))


def backbone_scale(backbone: Backbone) -> float:
    s = backbone.logit_scale
    return float(s) if s is not None and math.isfinite(float(s)) else DEFAULT_SCALE


@torch.no_grad()
def zero_shot_text(text: TextTower, names: list[str], template: str = DEFAULT_TEMPLATE) -> Tensor:
    """w_j^zs: projected text features of the template prompts [L, E] (frozen)."""
    return text.encode_text([template.format(n) for n in names]).projected.detach()


class PrefixCaching:
    """Capability of a feature method that reads the vision tokens after the first ``cache_prefix_blocks`` frozen
    blocks of the whole image (MMA, MMRL) instead of the pooled embedding: those tokens are what is cached."""

    cache_prefix_blocks: int


class FeatureMethod(nn.Module):
    """A method trained on frozen image features f = the backbone's pooled, projected whole-image embedding
    (cached once). Subclasses define ``forward(features) -> logits`` and may override ``train_step`` (ProGrad),
    ``fit_features`` (closed-form / full-batch methods) and ``extra_loss``."""

    name = "feature-method"
    default_hparams = Hparams()
    seed_dependent = True  # False: a deterministic fit (nothing trained, or full-batch from a data-derived init)

    def __init__(self, backbone: Backbone, labels: list[str], names: list[str],
                 template: str = DEFAULT_TEMPLATE) -> None:
        super().__init__()
        self.backbone = backbone
        backbone.freeze()
        self.labels, self.names, self.template = list(labels), list(names), template

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def init_from_features(self, features: Tensor) -> None:
        """Label-free initialisation from (training) image features, e.g. the head bias."""

    def extra_loss(self) -> Tensor | None:
        return None

    def loss(self, logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
        loss = masked_bce(logits, targets, mask)
        extra = self.extra_loss()
        return loss if extra is None else loss + extra

    def training_loss(self, features: Tensor, targets: Tensor) -> Tensor:
        """The mini-batch loss (MMRL adds its representation terms)."""
        return self.loss(self(features), targets)

    def train_step(self, features: Tensor, targets: Tensor, optimizer: torch.optim.Optimizer,
                   reduce_gradients: Callable[[list[nn.Parameter]], None] | None = None) -> Tensor:
        """One optimiser step; ``reduce_gradients`` all-reduces the gradients under data parallelism."""
        loss = self.training_loss(features, targets)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if reduce_gradients is not None:
            reduce_gradients(list(self.trainable_parameters().values()))
        optimizer.step()
        return loss.detach()

    def fit_features(self, x_train: Tensor, y_train: Tensor, x_val: Tensor | None, y_val: Tensor | None,
                     hp: Hparams) -> dict | None:
        """Closed-form / full-batch fitting; return None to use the generic mini-batch loop."""
        return None

    def config(self) -> dict:
        return {}
