"""QEncoder: learnable query tokens injected after block T1 of a frozen ViT, run through its own blocks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...backbones.base import VisionTower
from ...backbones.query_rows import block_and_query_rows, query_rows

ATTENTION_MODES = ("joint", "isolated")


class QEncoder(nn.Module):
    """Blocks 1..T1 run on the frozen tokens only (the cacheable prefix); then Q queries (N(0, 0.02)) are appended
    and blocks T1+1..T run on [frozen; queries].

    ``attention="joint"`` (paper): frozen tokens and queries attend to each other.
    ``attention="isolated"``: frozen tokens never see the queries, so their path is exactly the pretrained model
    (queries still attend to everything). Implemented with the backbone's own blocks, no masks: each block runs
    once on the frozen tokens alone and computes only the query rows of [frozen; queries] (see ``query_rows``).
    """

    def __init__(self, vision: VisionTower, t1: int, num_queries: int, attention: str = "isolated") -> None:
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if not 0 <= t1 < vision.depth:
            raise ValueError(f"t1 must satisfy 0 <= t1 < depth ({vision.depth}) so that queries see at least one "
                             f"block; got t1={t1}")
        if num_queries < 0:
            raise ValueError(f"num_queries must be >= 0, got {num_queries}")
        self.vision = vision  # frozen; not trained
        self.t1 = t1
        self.num_queries = num_queries
        self.attention = attention
        self.queries = nn.Parameter(torch.randn(num_queries, vision.width) * 0.02)

    def prefix(self, pixels: Tensor) -> Tensor:
        """Frozen tokens after block T1: [B, L, width]. Identical every epoch for fixed views (cacheable)."""
        with torch.no_grad():
            return self.vision.run_blocks(self.vision.embed(pixels), 0, self.t1)

    def forward_from_prefix(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Prefix tokens [B, L, width] -> (pooled frozen embedding [B, E], query outputs [B, Q, E])."""
        blocks = list(self.vision.blocks)[self.t1:]
        n_frozen = tokens.shape[1]
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        if self.num_queries == 0:
            return self.frozen_embedding(tokens), tokens.new_zeros(tokens.shape[0], 0, self.vision.embed_dim)
        if self.attention == "joint":
            x = torch.cat([tokens, q], dim=1)
            for block in blocks:
                x = block(x)
            frozen, q = x[:, :n_frozen], x[:, n_frozen:]
        else:
            frozen = tokens
            for block in blocks:
                frozen, q = block_and_query_rows(block, frozen, q)
        return self.vision.finalize(frozen), self.vision.finalize_tokens(q)

    def frozen_embedding(self, tokens: Tensor) -> Tensor:
        """Prefix tokens [B, L, width] -> the pretrained model's pooled embedding [B, E] (no queries)."""
        with torch.no_grad():
            return self.vision.finalize(self.vision.run_blocks(tokens, self.t1))

    def frozen_states(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Isolated mode's frozen path, which no parameter changes: prefix tokens [B, L, width] -> (inputs of
        blocks T1+1..T stacked [B, T-T1, L, width], pooled frozen embedding [B, E]). Cacheable like the prefix."""
        states = []
        with torch.no_grad():
            x = tokens
            for block in list(self.vision.blocks)[self.t1:]:
                states.append(x)
                x = block(x)
            return torch.stack(states, dim=1), self.vision.finalize(x)

    def forward_from_states(self, states: Tensor, frozen_embedding: Tensor) -> tuple[Tensor, Tensor]:
        """Isolated mode from cached frozen states: only the query rows are computed."""
        if self.attention != "isolated":
            raise ValueError("cached per-layer frozen states are exact only for attention='isolated'")
        q = self.queries.unsqueeze(0).expand(states.shape[0], -1, -1).to(states.dtype)
        if self.num_queries == 0:
            return frozen_embedding, states.new_zeros(states.shape[0], 0, self.vision.embed_dim)
        for j, block in enumerate(list(self.vision.blocks)[self.t1:]):
            q = query_rows(block, states[:, j], q)
        return frozen_embedding, self.vision.finalize_tokens(q)

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        return self.forward_from_prefix(self.prefix(pixels))
