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

    def __init__(self, model: nn.Module, image_size: int = 224, preprocess: PreprocessConfig | None = None) -> None:
        super().__init__()
        self.model = model
        cfg = model.config
        self.width = cfg.hidden_size
        self.depth = cfg.num_hidden_layers
        self.num_prefix_tokens = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.embed_dim = self.width
        self.preprocess = preprocess or PreprocessConfig(image_size, IMAGENET_MEAN, IMAGENET_STD, "bicubic")
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


def wrap_transformers(name: str, model: nn.Module, tokenizer=None, image_size: int | None = None,
                      processor: dict | None = None) -> Backbone:
    """Wrap a loaded transformers model (Dinov2Model, CLIPModel, CLIPVisionModel, SiglipModel, BERT-like).
    ``processor``: the checkpoint's preprocessor_config.json, read for Dinov2 (whose config has no input size:
    crop size, mean, std, resample); ``image_size`` overrides its size."""
    mtype = model.config.model_type
    if mtype == "dinov2":
        return Backbone(name, HFDinov2VisionTower(model, image_size or 224,
                                                  _dinov2_preprocess(processor, image_size) if processor else None))
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


@contextmanager
def local_loading_quiet(local: bool) -> Iterator[None]:
    """No progress bars while transformers reads a model from disk (5.x draws a "Loading weights" bar for every
    ``from_pretrained``, which would sit between medbridge's own progress and its one-line errors); the caller's
    setting is restored afterwards. Downloads (``local=False``) keep their bars."""
    from transformers.utils import logging as hf_logging

    was_on = local and hf_logging.is_progress_bar_enabled()
    if was_on:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def create_transformers(name: str, path_or_repo: str, image_size: int | None = None,
                        local_files_only: bool = False) -> Backbone:
    """Load a transformers vision(-language) model from a hub repo id or a local folder."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    cfg = AutoConfig.from_pretrained(path_or_repo, local_files_only=local_files_only)
    with local_loading_quiet(local_files_only):
        model = AutoModel.from_pretrained(path_or_repo, local_files_only=local_files_only)
    tokenizer = None
    if cfg.model_type in ("clip", "siglip"):
        tokenizer = AutoTokenizer.from_pretrained(path_or_repo, local_files_only=local_files_only)
    processor = _processor_config(path_or_repo, local_files_only) if cfg.model_type == "dinov2" else None
    return wrap_transformers(name, model, tokenizer, image_size, processor)


_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _processor_config(path_or_repo: str, local_files_only: bool) -> dict | None:
    """The checkpoint's preprocessor_config.json (a folder's or a hub repo's), or None when it has none."""
    import json
    from pathlib import Path

    from transformers.utils import cached_file

    path = cached_file(path_or_repo, "preprocessor_config.json", local_files_only=local_files_only,
                       _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
    return json.loads(Path(path).read_text()) if path else None


def _dinov2_preprocess(proc: dict, image_size: int | None) -> PreprocessConfig:
    """Input size (crop), mean and std from a Dinov2 checkpoint's image processor (RAD-DINO: its own values);
    what is missing keeps the defaults (224, ImageNet mean/std, bicubic)."""
    crop = proc.get("crop_size") or proc.get("size") or {}
    size = crop if isinstance(crop, int) else crop.get("height") or crop.get("shortest_edge") or 224
    return PreprocessConfig(int(image_size or size), tuple(proc.get("image_mean", IMAGENET_MEAN)),
                            tuple(proc.get("image_std", IMAGENET_STD)),
                            _RESAMPLE.get(proc.get("resample", 3), "bicubic"))


def create_hf_text_tower(path_or_repo: str, local_files_only: bool = False) -> HFTextTower:
    """Load a BERT-style sentence encoder (mean pooling) such as all-MiniLM-L6-v2 as a text tower."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused BERT pooler weights are expected, not worth a warning
    try:
        with local_loading_quiet(local_files_only):
            model = AutoModel.from_pretrained(path_or_repo, local_files_only=local_files_only,
                                              add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(level)
    tokenizer = AutoTokenizer.from_pretrained(path_or_repo, local_files_only=local_files_only)
    tower = HFTextTower(model, tokenizer, "bert", max_length=min(256, model.config.max_position_embeddings))
    for p in tower.parameters():
        p.requires_grad_(False)
    return tower.eval()


# ------------------------------------------------------------------------------------------------ registry entries
#: transformers text-only encoders (mean-pooled sentence encoders): text towers to pair, not backbones
SENTENCE_MODEL_TYPES = ("bert", "roberta", "mpnet", "xlm-roberta", "distilbert")
RAD_DINO = "microsoft/rad-dino"
MEDSIGLIP = "google/medsiglip-448"


def _build(spec, checkpoint: str | None) -> Backbone:
    return create_transformers(spec.name, spec.arch)


def _load(name: str, files) -> Backbone:
    src = files.source
    if files.model_type in SENTENCE_MODEL_TYPES:
        from .loading import BackboneError

        raise BackboneError(f"{src.location} is a text-only encoder: pair it with a vision backbone, "
                            f"e.g. 'dinov2-small+{src.raw}'")
    return create_transformers(name, src.location, local_files_only=src.is_local)


def _text(target) -> HFTextTower | None:
    """A sentence encoder folder or repo (model_type bert, roberta, ...) as a text tower alone."""
    if getattr(target, "model_type", None) not in SENTENCE_MODEL_TYPES:
        return None
    return create_hf_text_tower(target.source.location, local_files_only=target.source.is_local)


def _tiny(specs) -> dict:
    from . import tiny

    return {"tiny-hf-dinov2": lambda: tiny.tiny_hf("dinov2"), "tiny-hf-clip": lambda: tiny.tiny_hf("clip"),
            "tiny-hf-siglip": lambda: tiny.tiny_hf("siglip")}


def _tiny_saved(kind: str):
    def build() -> Backbone:
        from .tiny import tiny_saved

        return tiny_saved(kind)

    return build


def register_family() -> None:
    """The ``transformers`` family: Dinov2, CLIP and SigLIP models (and sentence encoders as text towers) from
    any repo or folder with a config.json that no other family claims; OpenAI CLIP, SigLIP, DINOv2, RAD-DINO and
    MedSigLIP by name."""
    from .registry import BackboneSpec, register_backbone, register_backbone_family

    register_backbone_family(name="transformers", build=_build, load=_load, text=_text, tiny=_tiny,
                             detect=lambda files: "config.json" in files.names, priority=-100,
                             help="Dinov2 / CLIP / SigLIP / sentence encoders with a config.json (the catch-all)")
    half = ((0.5,) * 3, (0.5,) * 3)
    for spec in (
        BackboneSpec("hf-clip-vit-b-16", "transformers", "hf-hub:openai/clip-vit-base-patch16", 768, 12, 224,
                     OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, True, "OpenAI CLIP ViT-B/16 via transformers",
                     arch="openai/clip-vit-base-patch16", aligned=True),
        BackboneSpec("hf-siglip-b-16", "transformers", "hf-hub:google/siglip-base-patch16-224", 768, 12, 224,
                     *half, True, "SigLIP ViT-B/16 via transformers", arch="google/siglip-base-patch16-224",
                     aligned=True),
        BackboneSpec("dinov2-base", "transformers", "hf-hub:facebook/dinov2-base", 768, 12, 224, IMAGENET_MEAN,
                     IMAGENET_STD, False, "Meta DINOv2 ViT-B/14 via transformers", arch="facebook/dinov2-base"),
        BackboneSpec("rad-dino", "transformers", f"hf-hub:{RAD_DINO}", 768, 12, 518, None, None, False,
                     "RAD-DINO: DINOv2 ViT-B/14 self-supervised on chest X-rays (vision only; mean/std from "
                     "its preprocessor_config.json)", arch=RAD_DINO, licence="MSRLA",
                     tiny=_tiny_saved("rad-dino")),
        BackboneSpec("medsiglip", "transformers", f"hf-hub:{MEDSIGLIP}", 1152, 27, 448, *half, True,
                     "MedSigLIP: SigLIP So400m/14 + text tower trained on medical image-text pairs (aligned "
                     "text, up to 64 tokens; gated repo)", arch=MEDSIGLIP, aligned=True,
                     licence="HAI-DEF terms of use", tiny=_tiny_saved("medsiglip")),
    ):
        register_backbone(spec)
