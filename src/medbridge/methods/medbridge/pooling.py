"""View pooling: a small self-attention over a set of tokens, then max-pooling (paper Sec. 3.2)."""

from __future__ import annotations

from torch import Tensor, nn


def _heads_for(dim: int, wanted: int) -> int:
    for h in range(min(wanted, dim), 0, -1):
        if dim % h == 0:
            return h
    return 1


class ViewPooling(nn.Module):
    """tokens [B, T, D] -> [B, D]: ``x + MHSA(LN(x))`` (output projection zero-initialised, so the block starts
    as the identity) then max over T. ``attention=False`` keeps only the max-pool."""

    def __init__(self, dim: int, heads: int = 4, attention: bool = True) -> None:
        super().__init__()
        self.attention = attention
        if attention:
            self.norm = nn.LayerNorm(dim)
            self.attn = nn.MultiheadAttention(dim, _heads_for(dim, heads), batch_first=True)
            nn.init.zeros_(self.attn.out_proj.weight)
            nn.init.zeros_(self.attn.out_proj.bias)

    def contextualize(self, tokens: Tensor) -> Tensor:
        if not self.attention:
            return tokens
        h = self.norm(tokens)
        return tokens + self.attn(h, h, h, need_weights=False)[0]

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (pooled [B, D], index of the token that gave each dimension's max [B, D])."""
        pooled, index = self.contextualize(tokens).max(dim=1)
        return pooled, index
