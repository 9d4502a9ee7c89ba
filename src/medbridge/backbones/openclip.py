"""open_clip models (CLIP, SigLIP, EVA-CLIP, MetaCLIP, CheXzero checkpoints) behind the backbone interface."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import Backbone, PreprocessConfig, TextFeatures, TextTokens, TextTower, TokenBlock, VisionTower
from .timm_vit import timm_vision_tower


def _preprocess_of(visual: nn.Module, default_size: int) -> PreprocessConfig:
    size = getattr(visual, "image_size", default_size)
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = tuple(getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
    std = tuple(getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))
    return PreprocessConfig(int(size), mean, std, "bicubic")


class OpenClipVisionTower(VisionTower):
    """open_clip's native ``VisionTransformer`` (conv1 -> [CLS; patches] + pos -> ln_pre -> blocks -> ln_post)."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        if getattr(visual, "attn_pool", None) is not None:
            raise NotImplementedError("open_clip vision towers with attentional pooling (CoCa) are not supported")
        self.visual = visual
        self.width = visual.conv1.out_channels
        self.depth = len(visual.transformer.resblocks)
        self.num_prefix_tokens = 1
        self.embed_dim = visual.proj.shape[1] if visual.proj is not None else self.width
        self.preprocess = _preprocess_of(visual, 224)
        self._blocks = nn.ModuleList(TokenBlock(b) for b in visual.transformer.resblocks)

    def embed(self, pixels: Tensor) -> Tensor:
        return self.visual._embeds(pixels)

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self._blocks

    def _project(self, x: Tensor) -> Tensor:
        return x @ self.visual.proj if self.visual.proj is not None else x

    def finalize_tokens(self, tokens: Tensor) -> Tensor:
        return self._project(self.visual.ln_post(tokens))

    def final_norm(self, tokens: Tensor) -> Tensor:
        """The final norm alone (no projection), e.g. for tokens projected by a method's own matrix."""
        return self.visual.ln_post(tokens)

    def finalize(self, tokens: Tensor) -> Tensor:
        pooled, _ = self.visual._pool(tokens)
        return self._project(pooled)

    def reference_forward(self, pixels: Tensor) -> Tensor:
        return self.visual(pixels)


class OpenClipTextTower(TextTower):
    """open_clip's text transformer, for both ``CLIP`` (attributes on the model) and ``CustomTextCLIP.text``."""

    def __init__(self, model: nn.Module, tokenizer) -> None:
        super().__init__()
        text = model.text if hasattr(model, "text") else model
        if getattr(text, "cls_emb", None) is not None:
            raise NotImplementedError("open_clip text towers with an appended CLS token (CoCa) are not supported")
        if not hasattr(text, "token_embedding"):
            raise NotImplementedError(f"unsupported open_clip text tower {type(text).__name__}")
        self.text = text
        self._model = model
        self.tokenizer = tokenizer
        self.width = text.token_embedding.embedding_dim
        proj = text.text_projection
        if proj is None:
            self.embed_dim = self.width
        elif isinstance(proj, nn.Linear):
            self.embed_dim = proj.out_features
        else:
            self.embed_dim = proj.shape[1]
        self.pooling = getattr(text, "text_pool_type", None) or getattr(text, "pool_type", "argmax")
        self.eos_id = getattr(text, "text_eos_id", None) or getattr(text, "eos_id", None)
        self.use_pad_mask = bool(getattr(text, "use_pad_mask", False))

    def tokenize(self, texts: list[str]) -> TextTokens:
        ids = self.tokenizer(list(texts)).to(self.device)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return TextTokens(ids, (ids != (0 if pad is None else pad)).long())

    def token_embeddings(self, tokens: TextTokens) -> Tensor:
        return self.text.token_embedding(tokens.input_ids)

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.text.transformer.resblocks

    def encode_with_inserted(self, embeddings: Tensor, tokens: TextTokens, start: int, make) -> TextFeatures:
        """Encode from word embeddings with K extra tokens placed right after BOS from block ``start`` on
        (``make(block_index) -> [K, width]``; inserted at ``start``, replaced at later blocks), the causal mask
        rebuilt for the longer sequence and pooling shifted by K (MMRL). OpenAI-style argmax pooling only."""
        if self.pooling != "argmax" or self.use_pad_mask:
            raise ValueError(f"token insertion supports argmax-pooled causal text towers, not {self.pooling!r}")
        ids = tokens.input_ids
        x = embeddings + self.text.positional_embedding[: ids.shape[1]].to(embeddings.dtype)
        mask = self._attn_mask(ids, x.dtype)
        k = 0
        for i, blk in enumerate(self.blocks):
            if i >= start:
                new = make(i).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], new, x[:, 1 + k:]], dim=1)
                k = new.shape[1]
                n = x.shape[1]
                mask = torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
            x = blk(x, attn_mask=mask)
        x = self.text.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1) + k]
        return TextFeatures(pooled, self.project(pooled))

    def _attn_mask(self, ids: Tensor, dtype: torch.dtype) -> Tensor | None:
        seq_len = ids.shape[1]
        mask = self.text.attn_mask
        if mask is not None:
            mask = mask[:seq_len, :seq_len].to(dtype)
        if self.use_pad_mask:
            pad_mask = self.text._build_additive_mask(ids, seq_len, dtype)
            mask = pad_mask if mask is None else mask.unsqueeze(0) + pad_mask
        return mask

    def encode_embeddings(self, embeddings: Tensor, tokens: TextTokens) -> TextFeatures:
        ids = tokens.input_ids
        x = embeddings + self.text.positional_embedding[: ids.shape[1]].to(embeddings.dtype)
        x = self.text.transformer(x, attn_mask=self._attn_mask(ids, x.dtype))
        x = self.text.ln_final(x)
        pooled = _pool_text(x, ids, self.pooling, self.eos_id)
        return TextFeatures(pooled, self.project(pooled))

    def project(self, pooled: Tensor) -> Tensor:
        proj = self.text.text_projection
        if proj is None:
            return pooled
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj

    def projection_weight(self) -> tuple[Tensor, Tensor | None] | None:
        proj = self.text.text_projection
        if proj is None:
            return None
        if isinstance(proj, nn.Linear):
            return proj.weight.detach(), None if proj.bias is None else proj.bias.detach()
        return proj.detach().t(), None

    def reference_encode(self, tokens: TextTokens) -> Tensor:
        return self._model.encode_text(tokens.input_ids)


def _pool_text(x: Tensor, ids: Tensor, pooling: str, eos_id: int | None) -> Tensor:
    rows = torch.arange(x.shape[0], device=x.device)
    if pooling == "argmax":
        return x[rows, ids.argmax(dim=-1)]
    if pooling == "eos":
        return x[rows, (ids == eos_id).int().argmax(dim=-1)]
    if pooling == "last":
        return x[:, -1]
    if pooling == "first":
        return x[:, 0]
    raise ValueError(f"unknown text pooling {pooling!r}")


class OpenClipHFTextTower(TextTower):
    """open_clip's ``HFTextEncoder`` (a transformers encoder such as BiomedCLIP's PubMedBERT): the encoder, open_clip's
    own pooler (CLS, mean or max over the padding mask) and its projection (linear or MLP)."""

    _POOLING = {"ClsPooler": "first", "ClsLastHiddenStatePooler": "first", "MeanPooler": "mean", "MaxPooler": "max"}

    def __init__(self, model: nn.Module, tokenizer) -> None:
        super().__init__()
        self.text = model.text
        self._model = model
        self.tokenizer = tokenizer
        self.width = self.text.transformer.config.hidden_size
        self.embed_dim = self.text.output_dim
        self.pooling = self._POOLING.get(type(self.text.pooler).__name__, type(self.text.pooler).__name__)
        self.max_length = getattr(tokenizer, "context_length", None) or self.text.context_length
        self.pad_id = self.text.config.pad_token_id

    def tokenize(self, texts: list[str]) -> TextTokens:
        ids = self.tokenizer(list(texts)).to(self.device)
        return TextTokens(ids, (ids != self.pad_id).long())  # HFTextEncoder's own mask

    def token_embeddings(self, tokens: TextTokens) -> Tensor:
        return self.text.transformer.get_input_embeddings()(tokens.input_ids)

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.text.transformer.encoder.layer

    def encode_embeddings(self, embeddings: Tensor, tokens: TextTokens) -> TextFeatures:
        out = self.text.transformer(inputs_embeds=embeddings, attention_mask=tokens.attention_mask)
        pooled = self.text.pooler(out, tokens.attention_mask)
        return TextFeatures(pooled, self.text.proj(pooled))

    def projection_weight(self) -> tuple[Tensor, Tensor | None] | None:
        proj = self.text.proj
        if not isinstance(proj, nn.Linear):  # Identity or an MLP: no single linear map
            return None
        return proj.weight.detach(), None if proj.bias is None else proj.bias.detach()

    def reference_encode(self, tokens: TextTokens) -> Tensor:
        return self._model.encode_text(tokens.input_ids)


def wrap_open_clip(name: str, model: nn.Module, tokenizer, aligned: bool = True) -> Backbone:
    """Wrap a built open_clip model (``CLIP`` or ``CustomTextCLIP``, native or HF text tower) as a
    :class:`Backbone`."""
    visual = model.visual
    if hasattr(visual, "trunk"):  # TimmModel: a timm ViT trunk plus an optional head
        vision: VisionTower = timm_vision_tower(visual.trunk, head=visual.head,
                                                preprocess=_preprocess_of(visual, 224))
    else:
        vision = OpenClipVisionTower(visual)
    hf_text = hasattr(getattr(model, "text", None), "transformer") and hasattr(model.text, "pooler")
    text = OpenClipHFTextTower(model, tokenizer) if hf_text else OpenClipTextTower(model, tokenizer)
    scale = float(model.logit_scale.exp().item()) if hasattr(model, "logit_scale") else None
    return Backbone(name, vision, text, logit_scale=scale, aligned=aligned)


def create_open_clip(name: str, arch: str, pretrained: str | None = None, checkpoint: str | None = None,
                     **kwargs) -> Backbone:
    """Build an open_clip architecture, optionally with hub/tag weights or an OpenAI/CheXzero-style checkpoint."""
    import open_clip

    from .loading import load_checkpoint_into

    model = open_clip.create_model(arch, pretrained=pretrained, **kwargs)
    if checkpoint is not None:
        load_checkpoint_into(model, checkpoint)
    tokenizer = open_clip.get_tokenizer(arch)
    return wrap_open_clip(name, model, tokenizer)


# ------------------------------------------------------------------------------------------------ registry entries
def _build(spec, checkpoint: str | None) -> Backbone:
    pretrained = None if checkpoint else spec.pretrained
    return create_open_clip(spec.name, spec.arch, pretrained=pretrained, checkpoint=checkpoint)


def _load(name: str, files) -> Backbone:
    """An open_clip model from ``hf-hub:`` / ``local-dir:`` (open_clip_config.json + weights; open_clip reads both
    forms itself, the tokenizer too)."""
    import open_clip

    uri = files.source.uri
    return wrap_open_clip(name, open_clip.create_model(uri), open_clip.get_tokenizer(uri))


def _tiny(specs) -> dict:
    from functools import partial

    from .tiny import tiny_open_clip

    return {f"tiny-{s.name}": partial(tiny_open_clip, s.arch) for s in specs if s.tiny is None}


def _tiny_biomedclip() -> Backbone:
    from .tiny import tiny_biomedclip

    return tiny_biomedclip()


def register_family() -> None:
    """The ``open_clip`` family: built-in architectures (+ pretrained tags or checkpoint files) and any
    ``open_clip_config.json`` repo or folder; registered CLIP-style models, CheXzero and BiomedCLIP."""
    from .base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from .registry import BackboneSpec, register_backbone, register_backbone_family

    register_backbone_family(name="open_clip", build=_build, load=_load, tiny=_tiny, checkpoints=True,
                             detect=lambda files: "open_clip_config.json" in files.names,
                             help="open_clip architectures; repos/folders with open_clip_config.json")
    oc = dict(family="open_clip", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, has_text=True, aligned=True)
    for spec in (
        BackboneSpec("clip-vit-b-16", source="hf-hub:timm/vit_base_patch16_clip_224.openai", vision_width=768,
                     depth=12, image_size=224, description="OpenAI CLIP ViT-B/16 (paper's standard expert)",
                     arch="ViT-B-16-quickgelu", pretrained="openai", **oc),
        BackboneSpec("clip-vit-b-32", source="hf-hub:timm/vit_base_patch32_clip_224.openai", vision_width=768,
                     depth=12, image_size=224, description="OpenAI CLIP ViT-B/32", arch="ViT-B-32-quickgelu",
                     pretrained="openai", **oc),
        BackboneSpec("chexzero", source="checkpoint file: chexzero@/path/to/best_64_5e-05_original_22000_0.864.pt",
                     vision_width=768, depth=12, image_size=224,
                     description="CheXzero (CLIP ViT-B/32 trained on MIMIC-CXR); weights from its .pt file",
                     arch="ViT-B-32-quickgelu", needs_checkpoint=True, **oc),
        BackboneSpec("metaclip-b-16", source="hf-hub:timm/vit_base_patch16_clip_224.metaclip_2pt5b",
                     vision_width=768, depth=12, image_size=224, description="MetaCLIP ViT-B/16",
                     arch="ViT-B-16-quickgelu", pretrained="metaclip_fullcc", **oc),
        BackboneSpec("siglip-vit-b-16", "open_clip", "hf-hub:timm/ViT-B-16-SigLIP", 768, 12, 224, (0.5,) * 3,
                     (0.5,) * 3, True, "SigLIP ViT-B/16 (timm trunk, MAP pooling, linear text head)",
                     arch="ViT-B-16-SigLIP", pretrained="webli", aligned=True),
        BackboneSpec("eva02-clip-b-16", source="hf-hub:timm/eva02_base_patch16_clip_224.merged2b_s8b_b131k",
                     vision_width=768, depth=12, image_size=224,
                     description="EVA-02-CLIP ViT-B/16 (timm EVA trunk, rotary positions)", arch="EVA02-B-16",
                     pretrained="merged2b_s8b_b131k", **oc),
        BackboneSpec("biomedclip", source=f"hf-hub:{BIOMEDCLIP}", vision_width=768, depth=12, image_size=224,
                     description="BiomedCLIP: ViT-B/16 + PubMedBERT text, contrastive on PMC-15M figure-caption "
                     "pairs (medical, aligned text)", arch=f"hf-hub:{BIOMEDCLIP}", licence="MIT",
                     tiny=_tiny_biomedclip, **oc),
    ):
        register_backbone(spec)


BIOMEDCLIP = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
