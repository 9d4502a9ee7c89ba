"""Focal sampling: window geometry, full-resolution crops, determinism, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medbridge.backbones.base import PreprocessConfig
from medbridge.data.focal import FocalConfig, focal_views, select_boxes, sliding_boxes
from medbridge.data.images import read_image

GREY = PreprocessConfig(224, (0.5,) * 3, (0.5,) * 3)


def test_nih_geometry_3x3_plus_whole():
    boxes = sliding_boxes(1024, 1024, 512, 256)
    assert len(boxes) == 9
    assert {b[0] for b in boxes} == {0, 256, 512} and {b[1] for b in boxes} == {0, 256, 512}
    cfg = FocalConfig(region_size=512, stride=256)
    assert cfg.max_views(1024, 1024) == 10
    views = focal_views(np.zeros((1024, 1024), np.uint8), cfg, GREY)
    assert views.pixels.shape == (10, 3, 224, 224)
    assert views.boxes[0].tolist() == [0, 0, 1024, 1024]


def test_last_window_aligned_to_edge_and_fraction_sizes():
    boxes = sliding_boxes(1000, 700, 400, 300)  # x: 0, 300 (last = 300 exactly), y: 0, 300, 600
    assert sorted({b[0] for b in boxes}) == [0, 300] and sorted({b[1] for b in boxes}) == [0, 300, 600]
    cfg = FocalConfig(region_size=0.5, stride=0.5)  # half the short side, stride half a region
    assert cfg.region_pixels(3000, 2500) == 1250 and cfg.stride_pixels(1250) == 625


def test_small_image_region_shrinks_to_short_side():
    cfg = FocalConfig(region_size=512, stride=256)
    boxes = select_boxes(300, 400, cfg, train=False)
    assert all(b[3] - b[1] == 300 and b[2] - b[0] == 300 for b in boxes)
    assert [b[0] for b in boxes] == [0, 100]


def test_regions_come_from_full_resolution():
    img = np.zeros((1024, 1024), np.float32)
    img[100:102, 100:102] = 1.0  # a 2-pixel dot: survives a 512->224 crop, nearly vanishes at 1024->224
    views = focal_views(img, FocalConfig(region_size=512, stride=256), PreprocessConfig(224, (0,) * 3, (1,) * 3))
    whole_peak = views.pixels[0].max().item()
    crop_peak = views.pixels[1].max().item()  # window (0, 0, 512, 512) contains the dot
    assert crop_peak > 0.3 and whole_peak < crop_peak / 2


def test_train_subsets_random_eval_deterministic():
    cfg = FocalConfig(region_size=512, stride=256, num_crops=4)
    a = select_boxes(1024, 1024, cfg, train=False)
    assert a == select_boxes(1024, 1024, cfg, train=False) and len(a) == 4
    draws = {tuple(select_boxes(1024, 1024, cfg, train=True, rng=np.random.default_rng(s))) for s in range(10)}
    assert len(draws) > 1
    rnd = FocalConfig(region_size=300, mode="random", num_crops=3)
    assert select_boxes(900, 800, rnd, train=False) == select_boxes(900, 800, rnd, train=False)


def test_random_eval_boxes_fixed_per_image_and_different_between_images(nih_sample):
    """Evaluation (and the cache) sees the same random boxes for an image every time, but not the same boxes
    for every image of a size (all NIH images are 1024 x 1024)."""
    cfg = FocalConfig(region_size=512, mode="random", num_crops=4)
    a, b = [read_image(p) for p in sorted((nih_sample / "images").glob("*.jpg"))[:2]]
    boxes_a = focal_views(a, cfg, GREY).boxes
    assert torch.equal(boxes_a, focal_views(a.copy(), cfg, GREY).boxes)
    assert not torch.equal(boxes_a, focal_views(b, cfg, GREY).boxes)


def test_rgb_and_16bit_and_real_xray(nih_sample):
    rgb = np.random.default_rng(0).integers(0, 255, (600, 500, 3), dtype=np.uint8)
    v = focal_views(rgb, FocalConfig(region_size=256), GREY)
    assert v.pixels.shape[1:] == (3, 224, 224)
    assert not torch.allclose(v.pixels[0, 0], v.pixels[0, 1])  # colour kept
    sixteen = (np.arange(512 * 512, dtype=np.uint32).reshape(512, 512) % 65535).astype(np.uint16)
    assert focal_views(sixteen, FocalConfig(region_size=256), GREY).pixels.shape[0] == 10
    real = read_image(next((nih_sample / "images").glob("*.jpg")))
    assert real.shape == (1024, 1024)
    assert focal_views(real, FocalConfig(), GREY).pixels.shape[0] == 10


@pytest.mark.parametrize("bad, match", [
    (np.zeros((4, 4, 2), np.uint8), "H x W"),
    (np.zeros((4, 4), np.int64), "unsupported dtype"),
    (np.full((4, 4), 3.0, np.float32), r"\[0, 1\]"),
])
def test_bad_images(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        focal_views(bad, FocalConfig(region_size=2), GREY)


def test_bad_configs():
    with pytest.raises(ValueError, match="mode"):
        FocalConfig(mode="grid")
    with pytest.raises(ValueError, match="num_crops"):
        FocalConfig(mode="random")
