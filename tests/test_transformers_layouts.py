"""What keeps medbridge working under both transformers 4.x and 5.x: DINOv2 weight names, quiet local loading."""

from __future__ import annotations

import torch

from medbridge.backbones.bundled import dinov2_layout
from medbridge.backbones.hf import local_loading_quiet

OLD = {"encoder.layer.0.attention.attention.query.weight": torch.zeros(1),
       "encoder.layer.0.attention.attention.key.bias": torch.ones(1),
       "encoder.layer.0.attention.attention.value.weight": torch.full((1,), 2.0),
       "encoder.layer.0.attention.output.dense.weight": torch.full((1,), 3.0),
       "encoder.layer.0.norm1.weight": torch.full((1,), 4.0)}


def test_dinov2_names_follow_the_installed_layout():
    assert dinov2_layout(OLD, {"encoder.layer.0.attention.attention.query.weight": None}) is OLD  # 4.x: as stored
    new = dinov2_layout(OLD, {"encoder.layer.0.attention.q_proj.weight": None})  # 5.x module
    assert set(new) == {"encoder.layer.0.attention.q_proj.weight", "encoder.layer.0.attention.k_proj.bias",
                        "encoder.layer.0.attention.v_proj.weight", "encoder.layer.0.attention.o_proj.weight",
                        "encoder.layer.0.norm1.weight"}
    assert new["encoder.layer.0.attention.o_proj.weight"] is OLD["encoder.layer.0.attention.output.dense.weight"]


def test_local_loading_silences_progress_bars_and_restores_the_callers_setting():
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    with local_loading_quiet(True):
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()
    with local_loading_quiet(False):  # downloads keep their bars
        assert hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with local_loading_quiet(True):
            pass
        assert not hf_logging.is_progress_bar_enabled()  # a caller's "off" stays off
    finally:
        hf_logging.enable_progress_bar()
