"""Tiny random-init versions of every backbone family, for tests (built offline in well under a second)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from .base import Backbone
from .bundled import minilm_dir
from .hf import HFTextTower, wrap_transformers
from .openclip import wrap_open_clip
from .timm_vit import timm_vision_tower

TINY_TIMM_FOR = {"vit_base_patch16_siglip_224": "vit_tiny_patch16_224",
                 "eva02_base_patch16_clip_224": "eva02_tiny_patch14_224"}


def _bert_tokenizer():
    """A real WordPiece tokenizer that ships offline (all-MiniLM-L6-v2's); ids < 30522."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()))


def tiny_open_clip(arch: str = "ViT-B-16-quickgelu", layers: int = 4, seed: int = 0) -> Backbone:
    """open_clip ``arch`` with its structure (quick-gelu, pooling, projection type, timm trunk) kept but tiny dims."""
    import open_clip
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = copy.deepcopy(open_clip.get_model_config(arch))
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture {arch!r}")
    torch.manual_seed(seed)
    vcfg, tcfg = cfg["vision_cfg"], cfg["text_cfg"]
    if vcfg.get("timm_model_name"):
        vcfg["timm_model_name"] = TINY_TIMM_FOR.get(vcfg["timm_model_name"], "vit_tiny_patch16_224")
        vcfg["image_size"] = 224
    else:
        vcfg.update(width=64, layers=layers, head_width=32, image_size=32, patch_size=8)
    tcfg.pop("hf_tokenizer_name", None)
    tcfg.pop("tokenizer_kwargs", None)
    tcfg.update(width=48, heads=2, layers=layers, vocab_size=49408, context_length=77)
    # a timm trunk without projection outputs its own width (192 for vit_tiny): the text side must match it
    cfg["embed_dim"] = 192 if vcfg.get("timm_model_name") and vcfg.get("timm_proj") in ("none", None) else 32
    if "-quickgelu" in arch:
        cfg["quick_gelu"] = True
    custom = cfg.pop("custom_text", False)
    cfg.pop("init_logit_bias", None) if not custom else None
    model = (CustomTextCLIP if custom else CLIP)(**cfg).eval()
    return wrap_open_clip(f"tiny:{arch}", model, open_clip.get_tokenizer("ViT-B-16"))


def tiny_timm_vit(arch: str = "vit_base_patch16_224", seed: int = 0, **kwargs) -> Backbone:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=32, patch_size=8, embed_dim=64,
                              depth=4, num_heads=2, **kwargs).eval()
    return Backbone(f"tiny:{arch}", timm_vision_tower(model))


def tiny_hf(model_type: str, seed: int = 0) -> Backbone:
    """Tiny transformers models: dinov2, clip, siglip (text towers use MiniLM's WordPiece vocabulary)."""
    model, tokenizer = tiny_hf_model(model_type, seed)
    return wrap_transformers(f"tiny:hf-{model_type}", model, tokenizer, image_size=32)


def tiny_hf_model(model_type: str, seed: int = 0):
    """The raw tiny transformers model and its tokenizer (None for vision-only models)."""
    from transformers import (
        CLIPConfig,
        CLIPModel,
        Dinov2Config,
        Dinov2Model,
        SiglipConfig,
        SiglipModel,
    )

    torch.manual_seed(seed)
    vision = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128,
                  image_size=32, patch_size=8)
    text = dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=2, intermediate_size=96,
                vocab_size=30522, max_position_embeddings=64)
    if model_type == "dinov2":
        return Dinov2Model(Dinov2Config(**vision)).eval(), None
    tok = _bert_tokenizer()
    if model_type == "clip":
        text.update(eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()
    elif model_type == "siglip":
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    else:
        raise ValueError(f"unknown tiny transformers model type {model_type!r}")
    return model, tok


def tiny_bert_text_tower(seed: int = 0) -> HFTextTower:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    model = BertModel(BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                                 vocab_size=30522, max_position_embeddings=64), add_pooling_layer=False).eval()
    return HFTextTower(model, _bert_tokenizer(), "bert", max_length=64)


# ------------------------------------------------------------------------------------------------ medical towers
# Tiny random models of the medical towers' architectures, saved in the on-disk form their hub repos have, so that
# tests load them through ``local-dir:`` exactly as the real checkpoints load.
TINY_OPENAI_MEAN_STD = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}


def _save_tokenizer(folder: Path) -> None:
    _bert_tokenizer().save_pretrained(str(folder))


def save_tiny_biomedclip(folder: str | Path, seed: int = 0) -> Path:
    """BiomedCLIP's layout, tiny: ``open_clip_config.json`` (a timm ViT trunk with open_clip's linear projection,
    an HF BERT text tower with CLS pooling and MLP projection, OpenAI mean/std), the WordPiece tokenizer files and
    ``open_clip_model.safetensors``. The text tower's HF config lives in ``folder/text-config`` (the real config
    names ``microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract``, fetched from the hub or its cache)."""
    import json

    import open_clip
    from safetensors.torch import save_file
    from transformers import BertConfig

    folder = Path(folder)
    text_dir = folder / "text-config"
    text_dir.mkdir(parents=True, exist_ok=True)
    BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96, vocab_size=30522,
               max_position_embeddings=64).save_pretrained(str(text_dir))
    cfg = {"model_cfg": {"embed_dim": 32,
                         "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                                        "timm_pool": "", "timm_proj": "linear", "image_size": 224},
                         "text_cfg": {"hf_model_name": str(text_dir), "hf_tokenizer_name": str(text_dir),
                                      "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                                      "context_length": 64}},
           "preprocess_cfg": TINY_OPENAI_MEAN_STD}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg, indent=1))
    _save_tokenizer(folder)
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{folder}", pretrained_hf=False)  # no weights yet: random init
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def save_tiny_rad_dino(folder: str | Path, seed: int = 0) -> Path:
    """RAD-DINO's layout, tiny: a transformers ``Dinov2Model`` (patch 14) saved with ``save_pretrained`` and a
    ``preprocessor_config.json`` giving its own crop size, mean and std (grey-level X-ray statistics)."""
    import json

    from transformers import Dinov2Config, Dinov2Model

    folder = Path(folder)
    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128,
                             image_size=56, patch_size=14)).eval().save_pretrained(str(folder))
    proc = {"image_processor_type": "BitImageProcessor", "crop_size": {"height": 56, "width": 56},
            "size": {"shortest_edge": 56}, "image_mean": [0.5307] * 3, "image_std": [0.2583] * 3, "resample": 3}
    (folder / "preprocessor_config.json").write_text(json.dumps(proc, indent=1))
    return folder


def save_tiny_medsiglip(folder: str | Path, seed: int = 0) -> Path:
    """MedSigLIP's layout, tiny: a transformers ``SiglipModel`` (patch 14, text of 64 positions) saved with
    ``save_pretrained``, tokenizer files (WordPiece here; the real repo ships its own SigLIP tokenizer) and a
    SigLIP ``preprocessor_config.json`` (mean/std 0.5)."""
    import json

    from transformers import SiglipConfig, SiglipModel

    folder = Path(folder)
    torch.manual_seed(seed)
    vision = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128, image_size=56,
                  patch_size=14)
    text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=30522,
                max_position_embeddings=64)  # as in MedSigLIP, both towers share one width (no projection)
    SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval().save_pretrained(str(folder))
    _save_tokenizer(folder)
    proc = {"image_processor_type": "SiglipImageProcessor", "size": {"height": 56, "width": 56},
            "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 2}
    (folder / "preprocessor_config.json").write_text(json.dumps(proc, indent=1))
    return folder


TINY_SAVERS = {"biomedclip": save_tiny_biomedclip, "rad-dino": save_tiny_rad_dino, "medsiglip": save_tiny_medsiglip}


def tiny_saved(kind: str, seed: int = 0) -> Backbone:
    """A tiny medical tower (``TINY_SAVERS``) saved to a temporary folder and loaded back through ``local-dir:``."""
    import tempfile

    from .registry import create_backbone

    with tempfile.TemporaryDirectory(prefix=f"medbridge-tiny-{kind}-") as tmp:
        backbone = create_backbone(f"local-dir:{TINY_SAVERS[kind](Path(tmp) / kind, seed)}")
    backbone.name = f"tiny:{kind}"
    return backbone


def tiny_biomedclip(seed: int = 0) -> Backbone:
    return tiny_saved("biomedclip", seed)
