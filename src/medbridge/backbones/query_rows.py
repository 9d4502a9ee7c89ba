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


def _frozen_part(blk: nn.Module, frozen: Tensor, fn):
    """``fn(frozen)`` for the frozen rows: without autograd when nothing there needs a gradient (the frozen tokens
    and the block's weights are constants), so training never back-propagates through the frozen rows."""
    if torch.is_grad_enabled() and (frozen.requires_grad or any(p.requires_grad for p in blk.parameters())):
        return fn(frozen)
    with torch.no_grad():
        return fn(frozen)


def _timm_block(blk: nn.Module, frozen: Tensor, q: Tensor, kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
    a = blk.attn
    dim = a.qkv.out_features // 3
    w, bias = a.qkv.weight, a.qkv.bias
    if kv is None:
        kv = _frozen_part(blk, frozen, lambda f: F.linear(blk.norm1(f), w[dim:], None if bias is None else bias[dim:])
                          .split(dim, dim=-1))
    qh, kq, vq = a.qkv(blk.norm1(q)).split(dim, dim=-1)
    k, v = torch.cat([kv[0], kq], dim=1), torch.cat([kv[1], vq], dim=1)
    qh, k, v = _heads(qh, a.num_heads), _heads(k, a.num_heads), _heads(v, a.num_heads)
    qh, k = a.q_norm(qh), a.k_norm(k)
    o = a.proj(a.norm(_merge(F.scaled_dot_product_attention(qh, k, v, scale=a.scale))))
    x = q + blk.drop_path1(blk.ls1(o))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def _dinov2_attention(blk: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module, int, float]:
    """(query, key, value, output) projections, heads and scale of a transformers ``Dinov2Layer``, in either
    layout: 4.x ``attention.attention.{query,key,value}`` + ``attention.output.dense``; 5.x
    ``attention.{q,k,v,o}_proj``."""
    a = blk.attention
    if hasattr(a, "q_proj"):
        return a.q_proj, a.k_proj, a.v_proj, a.o_proj, a.num_attention_heads, a.scaling
    att = a.attention
    return att.query, att.key, att.value, a.output.dense, att.num_attention_heads, att.scaling


def _dinov2_layer(blk: nn.Module, frozen: Tensor, q: Tensor, kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
    query, key, value, out, n, scale = _dinov2_attention(blk)
    if kv is None:
        kv = _frozen_part(blk, frozen, lambda f: (lambda h: (key(h), value(h)))(blk.norm1(f)))
    hq = blk.norm1(q)
    k, v = torch.cat([kv[0], key(hq)], dim=1), torch.cat([kv[1], value(hq)], dim=1)
    o = F.scaled_dot_product_attention(_heads(query(hq), n), _heads(k, n), _heads(v, n), scale=scale)
    x = q + blk.layer_scale1(out(_merge(o)))
    return x + blk.layer_scale2(blk.mlp(blk.norm2(x)))


def _open_clip_block(blk: nn.Module, frozen: Tensor, q: Tensor, kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
    hq = blk.ln_1(q)
    h = torch.cat([_frozen_part(blk, frozen, blk.ln_1), hq], dim=1)
    x = q + blk.ls_1(blk.attention(q_x=hq, k_x=h, v_x=h))
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


def _timm_kv_modules(blk: nn.Module) -> list[nn.Module]:
    return [blk.attn.qkv]


def _timm_kv(outputs: list[Tensor], blk: nn.Module) -> tuple[Tensor, Tensor]:
    dim = blk.attn.qkv.out_features // 3
    return outputs[0][..., dim:2 * dim], outputs[0][..., 2 * dim:]


def _dinov2_kv_modules(blk: nn.Module) -> list[nn.Module]:
    return list(_dinov2_attention(blk)[1:3])


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


# Where a block computes the frozen rows' keys and values (the module outputs to keep) when it runs on them alone.
_KV_CAPTURE = {"timm": (_timm_kv_modules, _timm_kv), "dinov2": (_dinov2_kv_modules, lambda outs, blk: tuple(outs))}


def block_and_query_rows(block: nn.Module, frozen: Tensor, queries: Tensor) -> tuple[Tensor, Tensor]:
    """``(block(frozen), query_rows(block, frozen, queries))`` in one pass over the frozen rows: the keys and values
    the block computes for them while it runs (its own projection modules, read through forward hooks) are reused
    for the queries instead of being projected a second time. The frozen output is computed without autograd."""
    inner = getattr(block, "block", block)
    kind = _kind(inner)
    capture = _KV_CAPTURE.get(kind) if kind is not None else None
    needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in inner.parameters())
    if capture is None or needs_grad or frozen.requires_grad:
        q = query_rows(block, frozen, queries)
        with torch.no_grad():
            return block(frozen), q
    modules, to_kv = capture
    outputs: list[list[Tensor]] = [[] for _ in modules(inner)]
    handles = [m.register_forward_hook(lambda _m, _i, out, store=store: store.append(out))
               for m, store in zip(modules(inner), outputs)]
    try:
        with torch.no_grad():
            out = block(frozen)
    finally:
        for h in handles:
            h.remove()
    if any(len(o) != 1 or o[0].shape[:2] != frozen.shape[:2] for o in outputs):  # not called once on these rows
        return out, query_rows(block, frozen, queries)
    return out, _IMPLS[kind](inner, frozen, queries, to_kv([o[0] for o in outputs], inner))


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
