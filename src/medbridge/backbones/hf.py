"""Hugging Face ``transformers`` models: Dinov2, CLIP, SigLIP vision/text towers and BERT-style sentence encoders."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Backbone,
    PreprocessConfig,
    TextFeatures,
    TextTokens,
    TextTower,
    TokenBlock,
    VisionTower,
)


# ------------------------------------------------------------------------------ transformers 4.x / 5.x module layout
# The one place where medbridge looks at how transformers lays out its modules; both major versions are supported.
@contextmanager
def no_init_weights() -> Iterator[None]:
    """transformers' own "skip weight initialisation" context (5.x: ``initialization``; 4.x: ``modeling_utils``)."""
    try:
        from transformers.initialization import no_init_weights as skip
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights as skip
    with skip():
        yield


def vision_transformer(model: nn.Module) -> nn.Module:
    """The module holding a CLIP / SigLIP vision tower's ``embeddings``, ``encoder`` and norms: 4.x wraps them in
    ``CLIPVisionModel.vision_model`` (a ``CLIPVisionTransformer``), 5.x holds them in the model itself."""
    return model if hasattr(model, "embeddings") else model.vision_model


def encoder_layer_call(layer: nn.Module) -> str:
    """How :class:`TokenBlock` calls a CLIP / SigLIP encoder layer: 4.x CLIP layers take ``(hidden, attention_mask,
    causal_attention_mask)`` ("hf_clip"), 5.x CLIP and all SigLIP layers ``(hidden, attention_mask)``."""
    return "hf_clip" if "causal_attention_mask" in inspect.signature(layer.forward).parameters else "hf_siglip"


def additive_attention_mask(mask: Tensor, dtype: torch.dtype, causal: bool = False) -> Tensor:
    """Padding mask [B, L] (1 = token) -> the additive mask [B, 1, L, L] text encoders take under 4.x and 5.x (0
    where attended, the dtype's minimum elsewhere); ``causal`` also hides later tokens (CLIP's text encoder, whose
    4.x ``causal_attention_mask`` argument 5.x dropped). Built here: ``modeling_attn_mask_utils`` is deprecated."""
    b, n = mask.shape
    allowed = mask.bool()[:, None, None, :].expand(b, 1, n, n)
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, torch.finfo(dtype).min)


class HFDinov2VisionTower(VisionTower):
    """``Dinov2Model``: embeddings (positions interpolated to the input size) -> layers -> layernorm -> CLS."""

    def __init__(self, model: nn.Module, image_size: int = 224) -> None:
        super().__init__()
        self.model = model
        cfg = model.config
        self.width = cfg.hidden_size
        self.depth = cfg.num_hidden_layers
        self.num_prefix_tokens = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.embed_dim = self.width
        self.preprocess = PreprocessConfig(image_size, IMAGENET_MEAN, IMAGENET_STD, "bicubic")
        self._blocks = nn.ModuleList(TokenBlock(b) for b in model.encoder.layer)

    def embed(self, pixels: Tensor) -> Tensor:
        return self.model.embeddings(pixels)

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self._blocks

    def finalize_tokens(self, tokens: Tensor) -> Tensor:
        return self.model.layernorm(tokens)

    def finalize(self, tokens: Tensor) -> Tensor:
        return self.model.layernorm(tokens)[:, 0]

    def reference_forward(self, pixels: Tensor) -> Tensor:
        return self.model(pixel_values=pixels).pooler_output


class HFClipVisionTower(VisionTower):
    """``CLIPVisionModel`` (+ the ``visual_projection`` of a ``CLIPModel`` when given) or SigLIP's vision model."""

    def __init__(self, vision_model: nn.Module, projection: nn.Module | None = None, kind: str = "clip") -> None:
        super().__init__()
        self.vm = vision_transformer(vision_model)  # 4.x: CLIPVisionTransformer; 5.x: CLIPVisionModel (likewise SigLIP)
        self.projection = projection
        self.kind = kind
        cfg = self.vm.config
        self.width = cfg.hidden_size
        self.depth = cfg.num_hidden_layers
        self.num_prefix_tokens = 1 if kind == "clip" else 0
        self.embed_dim = projection.out_features if projection is not None else self.width
        mean, std = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD) if kind == "clip" else ((0.5,) * 3, (0.5,) * 3)
        self.preprocess = PreprocessConfig(cfg.image_size, mean, std, "bicubic")
        self._blocks = nn.ModuleList(TokenBlock(b, encoder_layer_call(b)) for b in self.vm.encoder.layers)

    def embed(self, pixels: Tensor) -> Tensor:
        x = self.vm.embeddings(pixels)
        return self.vm.pre_layrnorm(x) if self.kind == "clip" else x

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self._blocks

    def _project(self, x: Tensor) -> Tensor:
        return self.projection(x) if self.projection is not None else x

    def finalize_tokens(self, tokens: Tensor) -> Tensor:
        return self._project(self.vm.post_layernorm(tokens))

    def finalize(self, tokens: Tensor) -> Tensor:
        if self.kind == "clip":
            return self._project(self.vm.post_layernorm(tokens[:, 0]))
        return self.vm.head(self.vm.post_layernorm(tokens))  # SigLIP: attention-pooling head

    def reference_forward(self, pixels: Tensor) -> Tensor:
        return self._project(self.vm(pixel_values=pixels).pooler_output)


class HFTextTower(TextTower):
    """HF text encoders: CLIP (causal, EOS pooling + projection), SigLIP (last token + head), BERT-style
    sentence encoders (mean pooling over the attention mask, as sentence-transformers does)."""

    def __init__(self, text_model: nn.Module, tokenizer, kind: str, projection: nn.Module | None = None,
                 max_length: int | None = None) -> None:
        super().__init__()
        self.tm = text_model
        self.tokenizer = tokenizer
        self.kind = kind
        self.projection = projection
        cfg = text_model.config
        self.width = cfg.hidden_size
        self.embed_dim = projection.out_features if projection is not None else self.width
        self.pooling = {"clip": "eos", "siglip": "last", "bert": "mean"}[kind]
        self.max_length = max_length or getattr(cfg, "max_position_embeddings", 77)

    @property
    def blocks(self):
        """The encoder layers (CLIP/SigLIP text ``encoder.layers``; BERT ``encoder.layer``)."""
        enc = self.tm.encoder
        return enc.layers if hasattr(enc, "layers") else enc.layer

    def tokenize(self, texts: list[str]) -> TextTokens:
        if self.kind == "siglip":  # SigLIP was trained on fixed-length padded text: pool at the last position
            enc = self.tokenizer(list(texts), padding="max_length", truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
        else:
            enc = self.tokenizer(list(texts), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
        mask = enc.get("attention_mask", torch.ones_like(enc["input_ids"]))
        return TextTokens(enc["input_ids"], mask).to(self.device)

    def _word_embedding(self) -> nn.Module:
        emb = self.tm.embeddings
        return emb.token_embedding if hasattr(emb, "token_embedding") else emb.word_embeddings

    def token_embeddings(self, tokens: TextTokens) -> Tensor:
        return self._word_embedding()(tokens.input_ids)

    def encode_embeddings(self, embeddings: Tensor, tokens: TextTokens) -> TextFeatures:
        ids, mask = tokens.input_ids, tokens.attention_mask
        if self.kind == "bert":
            x = self.tm.embeddings(inputs_embeds=embeddings, token_type_ids=torch.zeros_like(ids))
            x = self.tm.encoder(x, attention_mask=additive_attention_mask(mask, x.dtype)).last_hidden_state
            m = mask.unsqueeze(-1).to(x.dtype)
            pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        elif self.kind == "clip":
            x = self.tm.embeddings(inputs_embeds=embeddings)
            ext = additive_attention_mask(mask, x.dtype, causal=True)
            x = self.tm.encoder(inputs_embeds=x, attention_mask=ext).last_hidden_state
            x = self.tm.final_layer_norm(x)
            rows = torch.arange(x.shape[0], device=x.device)
            eos = self.tm.eos_token_id
            idx = ids.argmax(-1) if eos == 2 else (ids == eos).int().argmax(-1)
            pooled = x[rows, idx]
        else:  # siglip
            x = self.tm.embeddings(inputs_embeds=embeddings)
            x = self.tm.encoder(inputs_embeds=x).last_hidden_state
            pooled = self.tm.head(self.tm.final_layer_norm(x)[:, -1])
        return TextFeatures(pooled, self.project(pooled))

    def project(self, pooled: Tensor) -> Tensor:
        return self.projection(pooled) if self.projection is not None else pooled

    def projection_weight(self) -> tuple[Tensor, Tensor | None] | None:
        if self.projection is None:
            return None
        bias = self.projection.bias
        return self.projection.weight.detach(), None if bias is None else bias.detach()

    def reference_encode(self, tokens: TextTokens) -> Tensor:
        kwargs = {"input_ids": tokens.input_ids}
        if self.kind != "siglip":
            kwargs["attention_mask"] = tokens.attention_mask
        out = self.tm(**kwargs)
        if self.kind == "bert":
            x, m = out.last_hidden_state, tokens.attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            return (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return self.project(out.pooler_output)


def wrap_transformers(name: str, model: nn.Module, tokenizer=None, image_size: int | None = None) -> Backbone:
    """Wrap a loaded transformers model (Dinov2Model, CLIPModel, CLIPVisionModel, SiglipModel, BERT-like)."""
    mtype = model.config.model_type
    if mtype == "dinov2":
        return Backbone(name, HFDinov2VisionTower(model, image_size or 224))
    if mtype in ("clip", "siglip"):
        vision = HFClipVisionTower(model.vision_model, getattr(model, "visual_projection", None), kind=mtype)
        text = None
        if tokenizer is not None and hasattr(model, "text_model"):
            text = HFTextTower(model.text_model, tokenizer, mtype, getattr(model, "text_projection", None),
                               max_length=model.config.text_config.max_position_embeddings)
        scale = float(model.logit_scale.exp().item()) if hasattr(model, "logit_scale") else None
        return Backbone(name, vision, text, logit_scale=scale, aligned=text is not None)
    if mtype in ("clip_vision_model", "siglip_vision_model"):
        kind = "clip" if mtype.startswith("clip") else "siglip"
        return Backbone(name, HFClipVisionTower(model, None, kind=kind))
    raise NotImplementedError(f"unsupported transformers vision model_type {mtype!r} "
                              "(supported: dinov2, clip, clip_vision_model, siglip, siglip_vision_model)")


def create_transformers(name: str, path_or_repo: str, image_size: int | None = None,
                        local_files_only: bool = False) -> Backbone:
    """Load a transformers vision(-language) model from a hub repo id or a local folder."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    cfg = AutoConfig.from_pretrained(path_or_repo, local_files_only=local_files_only)
    model = AutoModel.from_pretrained(path_or_repo, local_files_only=local_files_only)
    tokenizer = None
    if cfg.model_type in ("clip", "siglip"):
        tokenizer = AutoTokenizer.from_pretrained(path_or_repo, local_files_only=local_files_only)
    return wrap_transformers(name, model, tokenizer, image_size)


def create_hf_text_tower(path_or_repo: str, local_files_only: bool = False) -> HFTextTower:
    """Load a BERT-style sentence encoder (mean pooling) such as all-MiniLM-L6-v2 as a text tower."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused BERT pooler weights are expected, not worth a warning
    try:
        model = AutoModel.from_pretrained(path_or_repo, local_files_only=local_files_only, add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(level)
    tokenizer = AutoTokenizer.from_pretrained(path_or_repo, local_files_only=local_files_only)
    tower = HFTextTower(model, tokenizer, "bert", max_length=min(256, model.config.max_position_embeddings))
    for p in tower.parameters():
        p.requires_grad_(False)
    return tower.eval()
