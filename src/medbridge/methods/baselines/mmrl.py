"""MMRL: Multi-Modal Representation Learning (Guo & Gu, CVPR 2025), specs/baselines.md section 10.

A shared representation space R [K, d_r] is mapped into both towers from block J = 6 (1-based) on: per block a
linear map (text F_t^i: d_r -> text width, vision F_v^i: d_r -> vision width; copies of one initial layer)
gives K tokens inserted right after CLS/BOS at block J and replacing them at later blocks. Class features
f_c = the model's own pooled image embedding; representation features f_r = mean_k LN_post(x_{1+k}) P_v^r with a
new random projection. Loss: a BCE(z_c) + (1 - a) BCE(z_r) + lam [(1 - cos(f_c, f_c^zs)) + (1 - cos(w, w^zs))].
Inference: a z_c + (1 - a) z_r. Runs the backbone's own blocks one at a time (no forked CLIP); open_clip CLIP-
family towers only (they expose the block loop, final norm and argmax pooling this needs). Trains on the cached
vision tokens after block J - 1 (the blocks before J never see the new tokens).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...backbones.base import Backbone
from ..heads import masked_bce
from ..prompts import DEFAULT_TEMPLATE
from .base import (
    ClipHead,
    FeatureMethod,
    Hparams,
    NotApplicableError,
    PrefixCaching,
    backbone_scale,
    require_aligned_text,
)


class MMRL(PrefixCaching, FeatureMethod):
    name = "mmrl"
    default_hparams = Hparams(optimizer="adamw", lr=1e-3, weight_decay=5e-4, epochs=50, batch_size=32)

    def __init__(self, backbone: Backbone, labels, names, template: str = DEFAULT_TEMPLATE, first: int = 6,
                 num_tokens: int = 5, rep_dim: int = 512, alpha: float = 0.7, lam: float = 0.5) -> None:
        super().__init__(backbone, labels, names, template)
        text = require_aligned_text(backbone, self.name)
        v = backbone.vision
        if not hasattr(text, "encode_with_inserted") or not hasattr(v, "final_norm"):
            raise NotApplicableError("mmrl needs an open_clip CLIP-family backbone (token insertion in both towers)")
        depth = min(v.depth, len(list(text.blocks)))
        if depth < first:
            raise NotApplicableError(f"mmrl inserts tokens from block {first}; the towers have {depth} blocks")
        self.first, self.alpha, self.lam, self.num_tokens = first, alpha, lam, num_tokens
        self.cache_prefix_blocks = first - 1
        n_layers = depth - first + 1
        self.rep = nn.Parameter(torch.randn(num_tokens, rep_dim) * 0.02)
        t0, v0 = nn.Linear(rep_dim, text.width), nn.Linear(rep_dim, v.width)
        self.to_text = nn.ModuleList(copy.deepcopy(t0) for _ in range(n_layers))
        self.to_vision = nn.ModuleList(copy.deepcopy(v0) for _ in range(n_layers))
        self.rep_proj = nn.Parameter(torch.randn(v.width, v.embed_dim) * v.width ** -0.5)
        self.head = ClipHead(len(labels), backbone_scale(backbone))
        self.tokens = text.tokenize([template.format(n) for n in self.names])
        with torch.no_grad():
            self.register_buffer("zs_text", text.encode(self.tokens).projected.detach())
            self.register_buffer("prompt_embeddings", text.token_embeddings(self.tokens).detach())

    # ---------------------------------------------------------------- towers with inserted tokens
    def text_features(self) -> Tensor:
        text = self.backbone.text
        return text.encode_with_inserted(self.prompt_embeddings, self.tokens.to(self.rep.device), self.first - 1,
                                         lambda i: self.to_text[i - self.first + 1](self.rep)).projected

    def image_features(self, prefix: Tensor) -> tuple[Tensor, Tensor]:
        """Vision tokens after block J-1 [B, L, width] -> (f_c, f_r)."""
        v = self.backbone.vision
        x, k = prefix, 0
        for i, blk in enumerate(list(v.blocks)[self.first - 1:], start=self.first - 1):
            new = self.to_vision[i - self.first + 1](self.rep).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], new, x[:, 1 + k:]], dim=1)
            k = new.shape[1]
            x = blk(x)
        f_c = v.finalize(x)
        f_r = (v.final_norm(x[:, 1:1 + k]) @ self.rep_proj).mean(1)
        return f_c, f_r

    def init_from_features(self, features: Tensor) -> None:
        with torch.no_grad():
            v = self.backbone.vision
            self.head.init_bias(v.finalize(v.run_blocks(features, self.first - 1)), self.zs_text)

    def _logits(self, prefix: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        w = self.text_features()
        f_c, f_r = self.image_features(prefix)
        return self.head(f_c, w), self.head(f_r, w), f_c, w

    def forward(self, prefix: Tensor) -> Tensor:
        z_c, z_r, _, _ = self._logits(prefix)
        return self.alpha * z_c + (1 - self.alpha) * z_r

    def loss_terms(self, prefix: Tensor, targets: Tensor) -> Tensor:
        z_c, z_r, f_c, w = self._logits(prefix)
        with torch.no_grad():
            v = self.backbone.vision
            f_zs = v.finalize(v.run_blocks(prefix, self.first - 1))
        reg = (1 - F.cosine_similarity(f_c, f_zs, dim=-1).mean()) + (1 - F.cosine_similarity(w, self.zs_text,
                                                                                            dim=-1).mean())
        return (self.alpha * masked_bce(z_c, targets) + (1 - self.alpha) * masked_bce(z_r, targets)
                + self.lam * reg)

    def training_loss(self, features, targets):
        return self.loss_terms(features, targets)

    def config(self) -> dict:
        return {"first": self.first, "num_tokens": self.num_tokens, "alpha": self.alpha, "lam": self.lam,
                "rep_dim": self.rep.shape[1]}
