"""Query rows of one transformer block when queries see the frozen tokens but not vice versa (isolated mode).

``query_rows(block, frozen, queries)`` equals ``block([frozen; queries])[:, len(frozen):]`` exactly, but computes
only what the query rows need: the block's own norm, key/value projections of all tokens, and query/MLP work for
the Q query rows (about 1/6 of a block for 257 frozen tokens). It uses the library's own modules (no copied
model code) for the block types it knows — timm ``Block``, transformers ``Dinov2Layer``, open_clip
``ResidualAttentionBlock`` — and falls back to running the whole block for any other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _heads(x: Tensor, n_heads: int) -> Tensor:
    b, n, d = x.shape
    return x.view(b, n, n_heads, d // n_heads).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _timm_block(blk: nn.Module, frozen: Tensor, q: Tensor) -> Tensor:
    a = blk.attn
    h = blk.norm1(torch.cat([frozen, q], dim=1))
    dim = a.qkv.out_features // 3
    w, bias = a.qkv.weight, a.qkv.bias
    qh = F.linear(h[:, frozen.shape[1]:], w[:dim], None if bias is None else bias[:dim])
    kv = F.linear(h, w[dim:], None if bias is None else bias[dim:])
    k, v = kv.split(dim, dim=-1)
    qh, k, v = _heads(qh, a.num_heads), _heads(k, a.num_heads), _heads(v, a.num_heads)
    qh, k = a.q_norm(qh), a.k_norm(k)
    o = a.proj(a.norm(_merge(F.scaled_dot_product_attention(qh, k, v, scale=a.scale))))
    x = q + blk.drop_path1(blk.ls1(o))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def _dinov2_layer(blk: nn.Module, frozen: Tensor, q: Tensor) -> Tensor:
    att = blk.attention.attention
    h = blk.norm1(torch.cat([frozen, q], dim=1))
    n = att.num_attention_heads
    qh = _heads(att.query(h[:, frozen.shape[1]:]), n)
    k, v = _heads(att.key(h), n), _heads(att.value(h), n)
    o = blk.attention.output.dense(_merge(F.scaled_dot_product_attention(qh, k, v, scale=att.scaling)))
    x = q + blk.layer_scale1(o)
    return x + blk.layer_scale2(blk.mlp(blk.norm2(x)))


def _open_clip_block(blk: nn.Module, frozen: Tensor, q: Tensor) -> Tensor:
    kv = blk.ln_1(torch.cat([frozen, q], dim=1))
    x = q + blk.ls_1(blk.attention(q_x=blk.ln_1(q), k_x=kv, v_x=kv))
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


def _kind(blk: nn.Module) -> str | None:
    name = f"{type(blk).__module__}.{type(blk).__qualname__}"
    attn = getattr(blk, "attn", None)
    if name == "timm.models.vision_transformer.Block" and type(attn).__qualname__ == "Attention" and \
            type(attn).__module__.startswith("timm.") and hasattr(attn, "qkv") and getattr(attn, "gate", None) is None:
        return "timm"
    if name.endswith("modeling_dinov2.Dinov2Layer"):
        return "dinov2"
    if name == "open_clip.transformer.ResidualAttentionBlock" and not hasattr(blk, "ln_1_kv"):
        return "open_clip"
    return None


_IMPLS = {"timm": _timm_block, "dinov2": _dinov2_layer, "open_clip": _open_clip_block}


def query_rows(block: nn.Module, frozen: Tensor, queries: Tensor) -> Tensor:
    """Output rows of ``queries`` for one block (a :class:`TokenBlock` or a library block)."""
    inner = getattr(block, "block", block)
    kind = _kind(inner)
    if kind is None:
        return block(torch.cat([frozen, queries], dim=1))[:, frozen.shape[1]:]
    return _IMPLS[kind](inner, frozen, queries)


def has_fast_path(block: nn.Module) -> bool:
    return _kind(getattr(block, "block", block)) is not None


def block_input_norm(block: nn.Module) -> nn.Module:
    """The block's own first normalisation (applied to its input before attention): timm ``norm1``, open_clip
    ``ln_1``, transformers ``norm1`` / ``layer_norm1``. Adapters that read "LN1(x)" (MMA) use it."""
    inner = getattr(block, "block", block)
    for name in ("norm1", "ln_1", "layer_norm1"):
        if hasattr(inner, name):
            return getattr(inner, name)
    raise ValueError(f"{type(inner).__name__}: no pre-attention norm found (expected norm1, ln_1 or layer_norm1)")
