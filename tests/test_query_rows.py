"""Isolated-mode shortcuts are exact: query rows only, and cached frozen states / prefixes."""

from __future__ import annotations

import pytest
import torch

from medbridge.backbones.query_rows import has_fast_path, query_rows
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
