"""Tiny random vision-language models of every supported VLM architecture (transformers' own config and model
classes, a few layers), for tests and the vision-only loading benchmark."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

TINY_VLM_TYPES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "gemma3", "paligemma", "internvl")


def _text(model_type: str, hidden: int, layers: int, vocab: int) -> dict:
    base = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                intermediate_size=2 * hidden, vocab_size=vocab)
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        base.update(model_type=model_type + "_text", rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                    head_dim=hidden // 2)
    elif model_type == "gemma3":
        base.update(model_type="gemma3_text", head_dim=hidden // 2, sliding_window=16)
    elif model_type == "paligemma":
        base.update(model_type="gemma", head_dim=hidden // 2)
    elif model_type == "internvl":
        base.update(model_type="qwen2")
    else:
        base.update(model_type="llama")
    return base


def tiny_vlm_config(model_type: str, text_hidden: int = 32, text_layers: int = 1, vocab: int = 256):
    """A transformers config of ``model_type`` with a 4-block vision tower (64-d, 32 px input) and a small LM."""
    import transformers as tf

    text = _text(model_type, text_hidden, text_layers, vocab)
    vit = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128,
               image_size=32, patch_size=8)
    if model_type == "llava":
        return tf.LlavaConfig(vision_config=dict(model_type="clip_vision_model", **vit), text_config=text,
                              image_token_index=3, vision_feature_layer=-2)
    if model_type == "llava_next":
        return tf.LlavaNextConfig(vision_config=dict(model_type="clip_vision_model", **vit), text_config=text,
                                  image_token_index=3, vision_feature_layer=-2,
                                  image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    if model_type == "gemma3":
        return tf.Gemma3Config(vision_config=dict(model_type="siglip_vision_model", vision_use_head=False, **vit),
                               text_config=text, mm_tokens_per_image=4, image_token_index=3, boi_token_index=4,
                               eoi_token_index=5)
    if model_type == "paligemma":
        return tf.PaliGemmaConfig(vision_config=dict(model_type="siglip_vision_model", vision_use_head=False,
                                                     projection_dim=text_hidden, **vit),
                                  text_config=text, projection_dim=text_hidden, image_token_index=3)
    if model_type == "internvl":
        vit_i = dict(vit, image_size=[32, 32], patch_size=[8, 8], use_mean_pooling=False)
        return tf.InternVLConfig(vision_config=vit_i, text_config=text, image_token_id=3, downsample_ratio=0.5)
    qwen_vision = dict(depth=4, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    if model_type == "qwen2_vl":
        return tf.Qwen2VLConfig(vision_config=dict(embed_dim=64, hidden_size=text_hidden, mlp_ratio=2,
                                                   **qwen_vision),
                                text_config=text, image_token_id=3, video_token_id=4, vision_start_token_id=5)
    if model_type == "qwen2_5_vl":
        return tf.Qwen2_5_VLConfig(vision_config=dict(hidden_size=64, intermediate_size=128,
                                                      out_hidden_size=text_hidden, window_size=16,
                                                      fullatt_block_indexes=[1, 3], **qwen_vision),
                                   text_config=text, image_token_id=3, video_token_id=4, vision_start_token_id=5)
    raise ValueError(f"unknown tiny VLM type {model_type!r} (known: {', '.join(TINY_VLM_TYPES)})")


def tiny_vlm_model(model_type: str, seed: int = 0, **text) -> nn.Module:
    """The full tiny ``*ForConditionalGeneration`` model (vision tower, projector and language model)."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(tiny_vlm_config(model_type, **text))
    with torch.no_grad():  # some projectors start at zero: random values make the equivalence tests meaningful
        for name, p in model.named_parameters():
            if "multi_modal_projector" in name and p.abs().sum() == 0:
                p.normal_(0, 0.2)
    return model.eval()


def save_tiny_vlm(folder: Path, model_type: str, seed: int = 0, max_shard_size: str | None = None,
                  **text) -> str:
    """Save a tiny VLM (and, for Qwen, its image processor limited to 32x32 px) like a hub download; returns
    its ``local-dir:`` source."""
    folder = Path(folder)
    model = tiny_vlm_model(model_type, seed, **text)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        from transformers import Qwen2VLImageProcessor

        Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16,
                              max_pixels=32 * 32).save_pretrained(folder)
    return f"local-dir:{folder}"


def tiny_vlm_backbone(model_type: str, seed: int = 0):
    """The vision side of a tiny VLM as a :class:`Backbone` (built in memory; Qwen at 32x32 px)."""
    from .vlm import wrap_vlm_model

    processor = {"max_pixels": 32 * 32} if model_type in ("qwen2_vl", "qwen2_5_vl") else None
    return wrap_vlm_model(f"tiny:vlm-{model_type}", tiny_vlm_model(model_type, seed), processor)
