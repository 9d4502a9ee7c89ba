"""MMA: Multi-Modal Adapter (Yang et al., CVPR 2024), specs/baselines.md section 9.

For blocks l = 5..12 (1-based) of both towers: x_{l+1} = Block_l(x_l) + s * U^l(S^l(D^l(LN1_l(x_l)))), with
D_t/U_t (text), D_v/U_v (vision) and a shared S^l; s = 0.001 and adapter gradients scaled by 1/s (the paper's
gradient trick, as a gradient hook). Implemented with forward hooks on the backbone's own blocks (active only
inside this module's forward): no forked CLIP code. Trains on the cached output of vision block 4 (blocks 1-4 never
see an adapter), so each step runs vision blocks 5-12 and the text tower on the fixed template prompts.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ...backbones.base import Backbone
from ...backbones.query_rows import block_input_norm
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


def _kaiming(layer: nn.Linear) -> nn.Linear:
    nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(layer.bias)
    return layer


class MMA(PrefixCaching, FeatureMethod):
    name = "mma"
    default_hparams = Hparams(optimizer="sgd", lr=0.0015, epochs=5, batch_size=16, warmup_epochs=0)
    cache_prefix_blocks = 4  # the engine caches vision tokens after this many blocks

    def __init__(self, backbone: Backbone, labels, names, template: str = DEFAULT_TEMPLATE, first: int = 5,
                 hidden: int = 32, scale: float = 0.001) -> None:
        super().__init__(backbone, labels, names, template)
        text = require_aligned_text(backbone, self.name)
        try:
            t_blocks, v_blocks = list(text.blocks), list(backbone.vision.blocks)
        except NotImplementedError as exc:
            raise NotApplicableError(f"mma needs block access on both towers: {exc}") from exc
        if len(t_blocks) < first or len(v_blocks) < first:
            raise NotApplicableError(f"mma adapts blocks {first}..end; the towers have {len(v_blocks)} / "
                                     f"{len(t_blocks)} blocks")
        self.first, self.scale = first, scale
        self.cache_prefix_blocks = first - 1
        n = min(len(t_blocks), len(v_blocks)) - first + 1
        tw, vw = text.width, backbone.vision.width
        self.text_down = nn.ModuleList(_kaiming(nn.Linear(tw, hidden)) for _ in range(n))
        self.text_up = nn.ModuleList(_kaiming(nn.Linear(hidden, tw)) for _ in range(n))
        self.vis_down = nn.ModuleList(_kaiming(nn.Linear(vw, hidden)) for _ in range(n))
        self.vis_up = nn.ModuleList(_kaiming(nn.Linear(hidden, vw)) for _ in range(n))
        self.shared = nn.ModuleList(_kaiming(nn.Linear(hidden, hidden)) for _ in range(n))
        self.head = ClipHead(len(labels), backbone_scale(backbone))
        self._active = False
        self._handles = []
        try:
            for blk in (*t_blocks[first - 1:], *v_blocks[first - 1:]):
                block_input_norm(blk)
        except ValueError as exc:  # e.g. post-norm BERT text towers
            raise NotApplicableError(f"mma reads each block's pre-attention norm: {exc}") from exc
        for k in range(n):
            l_idx = first - 1 + k
            self._handles.append(t_blocks[l_idx].register_forward_hook(self._hook(k, "text", t_blocks[l_idx])))
            self._handles.append(v_blocks[l_idx].register_forward_hook(self._hook(k, "vision", v_blocks[l_idx])))
        self.grad_trick = True  # adapter gradients x 1/s (switch off to compare with plain gradients)
        for p in self.adapter_parameters():
            p.register_hook(lambda g: g / self.scale if self.grad_trick else g)
        self.tokens = text.tokenize([template.format(n) for n in self.names])

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for m in (self.text_down, self.text_up, self.vis_down, self.vis_up, self.shared)
                for p in m.parameters()]

    def _hook(self, k: int, tower: str, block: nn.Module):
        norm = block_input_norm(block)
        down, up = (self.text_down[k], self.text_up[k]) if tower == "text" else (self.vis_down[k], self.vis_up[k])

        def hook(module, inputs, output):
            if not self._active:
                return None
            x = inputs[0]
            delta = up(torch.relu(self.shared[k](torch.relu(down(norm(x))))))
            if isinstance(output, tuple):
                return (output[0] + self.scale * delta, *output[1:])
            return output + self.scale * delta

        return hook

    @contextlib.contextmanager
    def adapters_on(self):
        self._active = True
        try:
            yield
        finally:
            self._active = False

    def text_features(self) -> Tensor:
        with self.adapters_on():
            return self.backbone.text.encode(self.tokens.to(self.head.bias.device)).projected

    def image_features(self, prefix: Tensor) -> Tensor:
        """Vision tokens after block ``first - 1`` [B, L, width] -> adapted pooled embedding [B, E]."""
        v = self.backbone.vision
        with self.adapters_on():
            return v.finalize(v.run_blocks(prefix, self.first - 1))

    def init_from_features(self, features: Tensor) -> None:
        with torch.no_grad():
            v = self.backbone.vision
            f = v.finalize(v.run_blocks(features, self.first - 1))  # adapters off: zero-shot features
            self.head.init_bias(f, self.backbone.text.encode(self.tokens.to(f.device)).projected)

    def forward(self, prefix: Tensor) -> Tensor:
        return self.head(self.image_features(prefix), self.text_features())

    def config(self) -> dict:
        return {"first": self.first, "scale": self.scale}

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
