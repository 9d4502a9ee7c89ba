"""View pooling: a small self-attention over a set of tokens, then max-pooling (paper Sec. 3.2)."""

from __future__ import annotations

from torch import Tensor, nn


def _heads_for(dim: int, wanted: int) -> int:
    for h in range(min(wanted, dim), 0, -1):
        if dim % h == 0:
            return h
    return 1


class ViewPooling(nn.Module):
    """tokens [B, T, D] -> [B, D]: ``x + MHSA(LN(x))`` (the last projection zero-initialised, so the block starts
    as the identity) then max over T. ``attention=False`` keeps only the max-pool. ``width`` < D: the attention
    runs in a ``width``-wide bottleneck, ``x + up(MHSA(down(LN(x))))`` (~``2 D w + 4 w^2`` parameters instead of
    ``4 D^2``)."""

    def __init__(self, dim: int, heads: int = 4, attention: bool = True, width: int | None = None) -> None:
        super().__init__()
        self.attention = attention
        if attention:
            width = dim if width is None else min(int(width), dim)
            self.norm = nn.LayerNorm(dim)
            self.down = nn.Linear(dim, width, bias=False) if width < dim else nn.Identity()
            self.attn = nn.MultiheadAttention(width, _heads_for(width, heads), batch_first=True)
            self.up = nn.Linear(width, dim) if width < dim else nn.Identity()
            last = self.up if width < dim else self.attn.out_proj
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def contextualize(self, tokens: Tensor) -> Tensor:
        if not self.attention:
            return tokens
        h = self.down(self.norm(tokens))
        return tokens + self.up(self.attn(h, h, h, need_weights=False)[0])

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (pooled [B, D], index of the token that gave each dimension's max [B, D])."""
        pooled, index = self.contextualize(tokens).max(dim=1)
        return pooled, index
