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
            raise NotImplementedError(f"unsupported open_clip text tower {type(text).__name__} (HF text towers: "
                                      "load the text model through transformers instead)")
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


def wrap_open_clip(name: str, model: nn.Module, tokenizer, aligned: bool = True) -> Backbone:
    """Wrap a built open_clip model (``CLIP`` or ``CustomTextCLIP``) as a :class:`Backbone`."""
    visual = model.visual
    if hasattr(visual, "trunk"):  # TimmModel: a timm ViT trunk plus an optional head
        vision: VisionTower = timm_vision_tower(visual.trunk, head=visual.head,
                                                preprocess=_preprocess_of(visual, 224))
    else:
        vision = OpenClipVisionTower(visual)
    text = OpenClipTextTower(model, tokenizer)
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
