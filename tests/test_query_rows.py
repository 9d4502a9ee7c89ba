"""Isolated-mode shortcuts are exact: query rows only, and cached frozen states / prefixes."""

from __future__ import annotations

import pytest
import torch

from medbridge.backbones.query_rows import block_and_query_rows, has_fast_path, query_rows
from medbridge.backbones.registry import tiny_builders
from medbridge.methods.medbridge.model import MedBridgeConfig, MedBridgeModel

BUILDERS = tiny_builders()
FAST = {"tiny-hf-dinov2", "tiny-timm-vit", "tiny-clip-vit-b-16", "tiny-siglip-vit-b-16"}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_query_rows_equal_full_block(name):
    torch.manual_seed(0)
    vision = BUILDERS[name]().vision
    size = vision.preprocess.image_size
    tokens = vision.embed(torch.randn(2, 3, size, size))
    queries = torch.randn(2, 3, vision.width) * 0.5
    block = vision.blocks[0]
    expected = block(torch.cat([tokens, queries], 1))[:, tokens.shape[1]:]
    got = query_rows(block, tokens, queries)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    if name in FAST:
        assert has_fast_path(block), f"{name} should use the query-rows shortcut"


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_block_and_query_rows_equal_full_block_with_gradients(name):
    """Reusing the frozen rows' keys/values (hooks) and skipping their backward changes neither the outputs nor
    the queries' gradient."""
    torch.manual_seed(0)
    vision = BUILDERS[name]().vision
    size = vision.preprocess.image_size
    tokens = vision.embed(torch.randn(2, 3, size, size)).detach()
    block = vision.blocks[1]
    base = torch.randn(2, 3, vision.width) * 0.5
    q_ref, q_new = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    full = block(torch.cat([tokens, q_ref], 1))
    frozen_out, rows = block_and_query_rows(block, tokens, q_new)
    torch.testing.assert_close(frozen_out, block(tokens), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rows, full[:, tokens.shape[1]:], atol=2e-5, rtol=1e-4)
    assert not frozen_out.requires_grad and rows.requires_grad
    weights = torch.randn_like(rows)
    (full[:, tokens.shape[1]:] * weights).sum().backward()
    (rows * weights).sum().backward()
    torch.testing.assert_close(q_new.grad, q_ref.grad, atol=1e-4, rtol=1e-3)
    with torch.no_grad():  # the same without autograd (prediction)
        torch.testing.assert_close(block_and_query_rows(block, tokens, base)[1], rows.detach(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("attention", ["isolated", "joint"])
def test_cached_forward_equals_direct(attention):
    torch.manual_seed(0)
    backbone = BUILDERS["tiny-hf-dinov2"]()
    text = BUILDERS["tiny-hf-clip"]().text
    cfg = MedBridgeConfig(labels=["a", "b", "c"], backbones=["tiny"], num_queries=4, attention=attention, t1=1)
    model = MedBridgeModel(cfg, [backbone], text=text).eval()
    size = backbone.vision.preprocess.image_size
    pixels = torch.randn(2, 3, 3, size, size)
    with torch.no_grad():
        direct = model(pixels).logits
        cached = model.cacheable(pixels)
        assert set(cached[0]) == ({"prefix"} if attention == "joint" else {"states", "frozen"})
        from_cache = model.forward_cached(cached).logits
        from_half = model.forward_cached([{k: v.half() for k, v in c.items()} for c in cached]).logits
    torch.testing.assert_close(from_cache, direct, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_half, direct, atol=5e-2, rtol=1e-2)  # fp16 storage tolerance
