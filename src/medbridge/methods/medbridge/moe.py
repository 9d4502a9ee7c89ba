"""Mixture of experts over K backbones: a gate from the pooled queries, v = sum_k g_k * W_k a_k."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ExpertMixture(nn.Module):
    """Maps each expert's class token a_k (width d_k) to a common width (identity where equal) and mixes them with
    per-image gate weights g = softmax(W [q_1; ...; q_K] + b). K = 1 skips the gate (g = 1)."""

    def __init__(self, dims: list[int], out_dim: int, gate_dims: list[int] | None = None) -> None:
        super().__init__()
        if not dims:
            raise ValueError("the mixture needs at least one expert")
        self.num_experts = len(dims)
        self.maps = nn.ModuleList(nn.Identity() if d == out_dim else nn.Linear(d, out_dim) for d in dims)
        gate_dims = gate_dims or dims
        self.gate = nn.Linear(sum(gate_dims), len(dims)) if len(dims) > 1 else None
        if self.gate is not None:  # start from an even mixture
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)

    def forward(self, class_tokens: list[Tensor], gate_inputs: list[Tensor]) -> tuple[Tensor, Tensor]:
        """class_tokens: K x [B, d_k]; gate_inputs: K x [B, g_k] -> (v [B, out_dim], g [B, K])."""
        mapped = torch.stack([m(a) for m, a in zip(self.maps, class_tokens)], dim=1)  # [B, K, D]
        if self.gate is None:
            g = mapped.new_ones(mapped.shape[0], 1)
        else:
            g = torch.softmax(self.gate(torch.cat(gate_inputs, dim=-1)), dim=-1)
        return (g.unsqueeze(-1) * mapped).sum(dim=1), g
