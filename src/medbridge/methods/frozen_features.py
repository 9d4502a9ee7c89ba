"""The frozen pooled embedding of every view: what the linear probe and the feature-space baselines train on."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..backbones.base import Backbone, backbone_fingerprint
from ..data.focal import FocalConfig
from .api import CacheSpec


def frozen_embeddings(backbones: list[Backbone], pixels: list[Tensor]) -> list[Tensor]:
    """Pooled output of each frozen backbone for every view: [B, N, E] per expert."""
    out = []
    with torch.no_grad():
        for b, px in zip(backbones, pixels):
            v = b.vision
            e = v.finalize(v.run_blocks(v.embed(px.flatten(0, 1)), 0))
            out.append(e.view(px.shape[0], px.shape[1], -1))
    return out


def embedding_cache_spec(backbones: list[Backbone], focal: FocalConfig, n_views: int) -> CacheSpec:
    """Cache of the frozen pooled embeddings of every view (``e{k}.frozen`` [N, E] per expert)."""
    preprocess = [b.vision.preprocess for b in backbones]
    shapes = {f"e{k}.frozen": (n_views, b.vision.embed_dim) for k, b in enumerate(backbones)}
    parts = {"what": "frozen-embeddings", "backbones": [backbone_fingerprint(b) for b in backbones],
             "focal": focal.to_dict(), "preprocess": [p.to_dict() for p in preprocess]}

    def compute(pixels: list[Tensor]) -> dict[str, Tensor]:
        return {f"e{k}.frozen": e for k, e in enumerate(frozen_embeddings(backbones, pixels))}

    return CacheSpec(parts, shapes, compute, focal, preprocess)


def has_embeddings(spec: CacheSpec, backbones: list[Backbone], focal: FocalConfig) -> bool:
    """Whether another cache holds the same pooled embeddings (e.g. MedBridge's isolated-mode cache of the same
    backbones, views and preprocessing)."""
    own = embedding_cache_spec(backbones, focal, 1)
    return (all(f"e{k}.frozen" in spec.shapes for k in range(len(backbones)))
            and all(spec.parts.get(key) == own.parts[key] for key in ("backbones", "focal", "preprocess")))


def read_embeddings(cache: Any, rows: np.ndarray, n_experts: int) -> list[Tensor]:
    """The cached pooled embeddings [len(rows), N, E] of each expert (float32, CPU)."""
    names = [f"e{k}.frozen" for k in range(n_experts)]
    values = cache.read(rows, names)
    return [values[n].float().cpu() for n in names]
