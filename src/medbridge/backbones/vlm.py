"""Vision towers of vision-language models (LLaVA 1.5/NeXT, Gemma 3 / MedGemma, PaliGemma, InternVL, Qwen2-VL,
Qwen2.5-VL) as frozen MedBridge experts, built from transformers' own modules with only the vision weights read.

What each tower outputs is what the VLM's language model receives for an image (its ``get_image_features``):
the vision encoder's tokens (at LLaVA's ``vision_feature_layer``) through the VLM's own projector.
``finalize`` is the mean of those image features; ``finalize_tokens`` applies the projector per token (query
tokens included). Where the projector merges neighbouring patches (InternVL's pixel shuffle, Qwen's patch
merger: 2x2 patches -> one token), a query token is merged as a 2x2 group of four copies of itself.
The language model is never built and its weights are never read (see ``vision_only_loading``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .base import (
    HALF_MEAN,
    HALF_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Backbone,
    PreprocessConfig,
    TokenBlock,
    VisionTower,
)
from .hf import encoder_layer_call, no_init_weights, vision_transformer
from .loading import BackboneError
from .vision_only_loading import checkpoint_weight_map, hub_vision_snapshot, load_submodule, select_prefixed

VISION_PREFIXES = ("model.vision_tower.", "vision_tower.")
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
QWEN_VISUAL_PREFIXES = ("model.visual.", "visual.")

# model_type -> (family shown to users, what part is used)
VLM_MODEL_TYPES = {
    "llava": "LLaVA 1.5", "llava_next": "LLaVA-NeXT", "gemma3": "Gemma 3 / MedGemma", "paligemma": "PaliGemma",
    "internvl": "InternVL", "qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL",
}
DEFAULT_MEAN_STD = {
    "llava": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), "llava_next": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "gemma3": (HALF_MEAN, HALF_STD), "paligemma": (HALF_MEAN, HALF_STD),
    "internvl": (IMAGENET_MEAN, IMAGENET_STD),
    "qwen2_vl": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), "qwen2_5_vl": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
}
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _feature_depth(num_layers: int, feature_layer: int) -> int:
    """Blocks run to reach ``hidden_states[feature_layer]`` (index 0 = the embeddings)."""
    depth = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 1 <= depth <= num_layers:
        raise BackboneError(f"vision_feature_layer {feature_layer} is outside a {num_layers}-layer vision tower")
    return depth


class LlavaVisionTower(VisionTower):
    """LLaVA 1.5 / NeXT: the CLIP vision tower up to ``vision_feature_layer`` (no post-layernorm, as LLaVA uses
    it), CLS dropped for the ``default`` select strategy, then LLaVA's MLP projector. LLaVA-NeXT's any-resolution
    tiling is not used: the tower sees one view at the CLIP input size (NeXT's base image)."""

    def __init__(self, clip_vision: nn.Module, projector: nn.Module, feature_layer: int, select_strategy: str,
                 preprocess: PreprocessConfig) -> None:
        super().__init__()
        if not isinstance(feature_layer, int):
            raise BackboneError(f"vision_feature_layer {feature_layer!r}: only a single layer is supported")
        if select_strategy not in ("default", "full"):
            raise BackboneError(f"unknown vision_feature_select_strategy {select_strategy!r}")
        self.clip = clip_vision  # CLIPVisionModel
        self.projector = projector
        self.select_strategy = select_strategy
        cfg = clip_vision.config
        self.width = cfg.hidden_size
        self.depth = _feature_depth(cfg.num_hidden_layers, feature_layer)
        self.num_prefix_tokens = 1
        self.embed_dim = projector.linear_2.out_features
        self.preprocess = preprocess
        encoder = self.vm.encoder
        encoder.layers = encoder.layers[: self.depth]  # the layers after the feature layer are never used
        self._blocks = nn.ModuleList(TokenBlock(b, encoder_layer_call(b)) for b in encoder.layers)

    @property
    def vm(self) -> nn.Module:
        """The CLIP tower's embeddings, encoder and norms (transformers 4.x: ``clip.vision_model``)."""
        return vision_transformer(self.clip)

    def embed(self, pixels: Tensor) -> Tensor:
        return self.vm.pre_layrnorm(self.vm.embeddings(pixels))

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self._blocks

    def finalize_tokens(self, tokens: Tensor) -> Tensor:
        return self.projector(tokens)

    def _image_features(self, tokens: Tensor) -> Tensor:
        return self.projector(tokens[:, 1:] if self.select_strategy == "default" else tokens)

    def finalize(self, tokens: Tensor) -> Tensor:
        return self._image_features(tokens).mean(1)

    def reference_forward(self, pixels: Tensor) -> Tensor:
        hidden = self.clip(pixel_values=pixels, output_hidden_states=True).hidden_states[self.depth]
        return self._image_features(hidden).mean(1)


class SiglipVLMTower(VisionTower):
    """Gemma 3 / MedGemma and PaliGemma: the SigLIP vision tower (post-layernorm tokens) then the VLM projector.

    Gemma 3's projector average-pools the patch grid to ``mm_tokens_per_image`` tokens before its RMS norm and
    linear map: ``finalize`` uses it as is; per token (queries) only the norm and linear map apply.
    PaliGemma's projector is a per-token linear map followed by the division by sqrt(text width) it applies
    (transformers 4.x; 5.x scales the text tokens' embeddings instead, so the language model receives the same, and
    this tower keeps the 4.x values under both: features, and adapters trained on them, do not depend on the version).
    """

    def __init__(self, siglip_vision: nn.Module, projector: nn.Module, kind: str, text_width: int,
                 preprocess: PreprocessConfig) -> None:
        super().__init__()
        self.siglip = siglip_vision  # SiglipVisionModel
        self.projector = projector
        self.kind = kind
        self.text_scale = text_width ** 0.5
        cfg = siglip_vision.config
        self.width = cfg.hidden_size
        self.depth = cfg.num_hidden_layers
        self.num_prefix_tokens = 0
        self.embed_dim = text_width
        self.preprocess = preprocess
        self._blocks = nn.ModuleList(TokenBlock(b, encoder_layer_call(b)) for b in self.vm.encoder.layers)

    @property
    def vm(self) -> nn.Module:
        """The SigLIP tower's embeddings, encoder and norms (transformers 4.x: ``siglip.vision_model``)."""
        return vision_transformer(self.siglip)

    def embed(self, pixels: Tensor) -> Tensor:
        return self.vm.embeddings(pixels)

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self._blocks

    def finalize_tokens(self, tokens: Tensor) -> Tensor:
        x = self.vm.post_layernorm(tokens)
        if self.kind == "gemma3":
            p = self.projector
            return torch.matmul(p.mm_soft_emb_norm(x), p.mm_input_projection_weight).type_as(x)
        return self.projector(x) / self.text_scale

    def _image_features(self, last_hidden: Tensor) -> Tensor:
        if self.kind == "gemma3":
            return self.projector(last_hidden)
        return self.projector(last_hidden) / self.text_scale

    def finalize(self, tokens: Tensor) -> Tensor:
        return self._image_features(self.vm.post_layernorm(tokens)).mean(1)

    def reference_forward(self, pixels: Tensor) -> Tensor:
        return self._image_features(self.siglip(pixel_values=pixels).last_hidden_state).mean(1)


class InternVLVisionTower(VisionTower):
    """InternVL (InternViT): CLS + patch tokens, the final layernorm, CLS dropped, pixel shuffle (2x2 patches ->
    one token of 4x width) and the MLP projector, as ``InternVLModel.get_image_features`` does."""

    def __init__(self, vision: nn.Module, projector: nn.Module, feature_layer: int, select_strategy: str,
                 downsample_ratio: float, preprocess: PreprocessConfig) -> None:
        super().__init__()
        if feature_layer != -1:  # transformers 4.57's own InternVL cannot read other layers either
            raise BackboneError(f"InternVL vision_feature_layer {feature_layer}: only -1 (the last layer) is supported")
        if select_strategy not in ("default", "full"):
            raise BackboneError(f"unknown vision_feature_select_strategy {select_strategy!r}")
        self.vision = vision  # InternVLVisionModel
        self.projector = projector
        self.select_strategy = select_strategy
        self.downsample_ratio = downsample_ratio
        self.group = int(round(1 / downsample_ratio)) ** 2
        cfg = vision.config
        self.width = cfg.hidden_size
        self.depth = cfg.num_hidden_layers
        self.num_prefix_tokens = 1
        self.embed_dim = projector.linear_2.out_features
        self.preprocess = preprocess
        self._blocks = nn.ModuleList(TokenBlock(b) for b in vision.encoder.layer)

    def embed(self, pixels: Tensor) -> Tensor:
        out = self.vision.embeddings(pixels)  # 4.x: (tokens, patch grid); 5.x: tokens
        return out[0] if isinstance(out, tuple) else out

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self._blocks

    def finalize_tokens(self, tokens: Tensor) -> Tensor:
        x = self.vision.layernorm(tokens)
        return self.projector(x.repeat(1, 1, self.group))  # a 2x2 group of four copies of the token

    def _image_features(self, hidden: Tensor) -> Tensor:
        from transformers.models.internvl.modeling_internvl import InternVLModel

        if self.select_strategy == "default":
            hidden = hidden[:, 1:]
        b, n, d = hidden.shape
        side = int(n ** 0.5)
        grid = hidden.reshape(b, side, side, d)
        shuffled = InternVLModel.pixel_shuffle(None, grid, scale_factor=self.downsample_ratio)  # no state used
        return self.projector(shuffled.reshape(b, -1, shuffled.shape[-1]))

    def finalize(self, tokens: Tensor) -> Tensor:
        return self._image_features(self.vision.layernorm(tokens)).mean(1)

    def reference_forward(self, pixels: Tensor) -> Tensor:
        return self._image_features(self.vision(pixel_values=pixels).last_hidden_state).mean(1)


# ------------------------------------------------------------------------------------------------ loading
def _preprocessor_config(folder: Path) -> dict:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise BackboneError(f"{path}: not valid JSON ({exc})") from exc


def _preprocess(model_type: str, image_size: int, proc: dict) -> PreprocessConfig:
    mean, std = DEFAULT_MEAN_STD[model_type]
    mean = tuple(proc.get("image_mean", mean))
    std = tuple(proc.get("image_std", std))
    interpolation = _RESAMPLE.get(proc.get("resample", 3), "bicubic")
    return PreprocessConfig(int(image_size), mean, std, interpolation)


def _vision_model(config) -> nn.Module:
    from transformers import AutoModel

    with no_init_weights():  # every weight is loaded from the checkpoint next
        return AutoModel.from_config(config).float().eval()


def _projector(model_type: str, config) -> nn.Module:
    if model_type == "llava":
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector as cls
    elif model_type == "llava_next":
        from transformers.models.llava_next.modeling_llava_next import LlavaNextMultiModalProjector as cls
    elif model_type == "gemma3":
        from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector as cls
    elif model_type == "paligemma":
        from transformers.models.paligemma.modeling_paligemma import PaliGemmaMultiModalProjector as cls
    else:
        from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector as cls
    with no_init_weights():
        return cls(config).float().eval()


def _square_size(config, where: str) -> int:
    size = config.vision_config.image_size
    if isinstance(size, (list, tuple)):  # InternVL: [height, width]
        if len(set(size)) != 1:
            raise BackboneError(f"{where}: non-square vision input {list(size)} is not supported")
        size = size[0]
    return int(size)


def tower_from_parts(config, vision: nn.Module, projector: nn.Module | None, processor: dict | None = None,
                     where: str = "model") -> VisionTower:
    """The tower for a VLM ``config`` from its vision module (``visual`` for Qwen) and projector (None for Qwen)."""
    model_type = config.model_type
    proc = processor or {}
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        from .qwen_vl import QwenVisionTower, qwen_image_size, use_masked_sdpa

        if model_type == "qwen2_5_vl":
            use_masked_sdpa(vision.config)
        size = qwen_image_size(config.vision_config, proc)
        return QwenVisionTower(vision, size, _preprocess(model_type, size, proc))
    preprocess = _preprocess(model_type, _square_size(config, where), proc)
    if model_type in ("llava", "llava_next"):
        return LlavaVisionTower(vision, projector, config.vision_feature_layer,
                                config.vision_feature_select_strategy, preprocess)
    if model_type in ("gemma3", "paligemma"):
        return SiglipVLMTower(vision, projector, model_type, config.text_config.hidden_size, preprocess)
    if model_type == "internvl":
        return InternVLVisionTower(vision, projector, config.vision_feature_layer,
                                   config.vision_feature_select_strategy, config.downsample_ratio, preprocess)
    raise BackboneError(f"{where}: model_type {model_type!r} is not a supported VLM "
                        f"(supported: {', '.join(sorted(VLM_MODEL_TYPES))})")


def build_vlm_tower(config, folder: Path, read_log: list[str] | None = None) -> VisionTower:
    """The vision tower of the VLM whose ``config`` and checkpoint are in ``folder`` (vision tensors only)."""
    model_type = config.model_type
    if model_type not in VLM_MODEL_TYPES:
        raise BackboneError(f"{folder}: model_type {model_type!r} is not a supported VLM "
                            f"(supported: {', '.join(sorted(VLM_MODEL_TYPES))})")
    weights = checkpoint_weight_map(folder)
    proc = _preprocessor_config(folder)
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        from .qwen_vl import qwen_visual_model

        visual = qwen_visual_model(config)
        load_submodule(visual, folder, QWEN_VISUAL_PREFIXES, weights, read_log, "Qwen vision (visual.*)")
        return tower_from_parts(config, visual, None, proc, str(folder))
    vcfg = config.vision_config
    # pooling-head tensors are named vision_model.head.* (saved by transformers 4.x) or head.* (5.x)
    if vcfg.model_type == "siglip_vision_model" and getattr(vcfg, "vision_use_head", True) and \
            not any(".head." in f".{k}" for k in select_prefixed(weights, VISION_PREFIXES).values()):
        vcfg.vision_use_head = False  # a VLM's SigLIP without its pooling head (SigLIP defaults to one)
    vision = _vision_model(vcfg)
    load_submodule(vision, folder, VISION_PREFIXES, weights, read_log, "vision tower")
    projector = _projector(model_type, config)
    load_submodule(projector, folder, PROJECTOR_PREFIXES, weights, read_log, "multi-modal projector")
    return tower_from_parts(config, vision, projector, proc, str(folder))


def wrap_vlm_model(name: str, model: nn.Module, processor: dict | None = None) -> Backbone:
    """A :class:`Backbone` around the vision side of an already built ``*ForConditionalGeneration`` model (for
    Qwen2.5-VL, its vision attention becomes the masked SDPA of ``qwen_vl``: plain SDPA when given no mask)."""
    inner = model.model
    if model.config.model_type in ("qwen2_vl", "qwen2_5_vl"):
        return Backbone(name, tower_from_parts(model.config, inner.visual, None, processor))
    return Backbone(name, tower_from_parts(model.config, inner.vision_tower, inner.multi_modal_projector, processor))



def create_vlm_backbone(name: str, folder: str | Path, read_log: list[str] | None = None) -> Backbone:
    """A frozen vision-only :class:`Backbone` from a VLM checkpoint folder (pair a text tower with ``VISION+TEXT``)."""
    from transformers import AutoConfig

    folder = Path(folder)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    return Backbone(name, build_vlm_tower(config, folder, read_log))


def create_vlm_from_hub(name: str, repo: str) -> Backbone:
    """Download only the config, processor config and the shards holding vision tensors, then build the tower."""
    prefixes = VISION_PREFIXES + PROJECTOR_PREFIXES + QWEN_VISUAL_PREFIXES
    return create_vlm_backbone(name, hub_vision_snapshot(repo, prefixes))


# ------------------------------------------------------------------------------------------------ registry entries
def _entry(name: str, repo: str, width: int, depth: int, size: int, mean_std: tuple, description: str) -> dict:
    mean, std = mean_std
    return dict(name=name, family="vlm", source=f"hf-hub:{repo}", vision_width=width, depth=depth, image_size=size,
                mean=mean, std=std, has_text=False, description=description, arch=repo)


_CLIP = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
_HALF = (HALF_MEAN, HALF_STD)
_INET = (IMAGENET_MEAN, IMAGENET_STD)
# Published checkpoints (keyword arguments of registry.BackboneSpec; registered by register_family below).
# depth = blocks run (LLaVA stops at vision_feature_layer -2). Sizes: parameters the tower holds (vision +
# projector at the published sizes: benchmarks/vlm_tower_speed.py), of ~N = the whole VLM as its model card states.
VLM_BACKBONE_SPECS = [
    _entry("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf", 1024, 23, 336, _CLIP,
           "LLaVA-1.5 7B: CLIP ViT-L/14-336 to layer -2 + MLP projector (0.31B of ~7.1B; 4096-d tokens)"),
    _entry("llava-1.5-13b", "llava-hf/llava-1.5-13b-hf", 1024, 23, 336, _CLIP,
           "LLaVA-1.5 13B: CLIP ViT-L/14-336 to layer -2 + MLP projector (0.32B of ~13B; 5120-d tokens)"),
    _entry("llava-v1.6-mistral-7b", "llava-hf/llava-v1.6-mistral-7b-hf", 1024, 23, 336, _CLIP,
           "LLaVA-NeXT Mistral 7B: CLIP ViT-L/14-336 to layer -2 + projector, base view (0.31B of ~7.6B)"),
    _entry("llava-v1.6-vicuna-7b", "llava-hf/llava-v1.6-vicuna-7b-hf", 1024, 23, 336, _CLIP,
           "LLaVA-NeXT Vicuna 7B: CLIP ViT-L/14-336 to layer -2 + projector, base view (0.31B of ~7.1B)"),
    _entry("qwen2-vl-2b", "Qwen/Qwen2-VL-2B-Instruct", 1280, 32, 448, _CLIP,
           "Qwen2-VL 2B: its ViT (2D RoPE) + patch merger, 448 px -> 256 tokens (0.67B of ~2.2B; 1536-d)"),
    _entry("qwen2-vl-7b", "Qwen/Qwen2-VL-7B-Instruct", 1280, 32, 448, _CLIP,
           "Qwen2-VL 7B: its ViT (2D RoPE) + patch merger, 448 px -> 256 tokens (0.68B of ~8.3B; 3584-d)"),
    _entry("qwen2.5-vl-3b", "Qwen/Qwen2.5-VL-3B-Instruct", 1280, 32, 448, _CLIP,
           "Qwen2.5-VL 3B: windowed ViT (2D RoPE) + patch merger, 448 px (0.67B of ~3.8B; 2048-d)"),
    _entry("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", 1280, 32, 448, _CLIP,
           "Qwen2.5-VL 7B: windowed ViT (2D RoPE) + patch merger, 448 px (0.68B of ~8.3B; 3584-d)"),
    _entry("medgemma-4b", "google/medgemma-4b-it", 1152, 27, 896, _HALF,
           "MedGemma 4B: medical SigLIP-So400m/14-896 + Gemma 3 projector (0.42B of ~4.3B; 2560-d)"),
    _entry("medgemma-4b-pt", "google/medgemma-4b-pt", 1152, 27, 896, _HALF,
           "MedGemma 4B pretrained: medical SigLIP-So400m/14-896 + projector (0.42B of ~4.3B; 2560-d)"),
    _entry("gemma-3-4b", "google/gemma-3-4b-it", 1152, 27, 896, _HALF,
           "Gemma 3 4B: SigLIP-So400m/14-896 + projector (0.42B of ~4.3B; 2560-d)"),
    _entry("paligemma-3b-224", "google/paligemma-3b-pt-224", 1152, 27, 224, _HALF,
           "PaliGemma 3B: SigLIP-So400m/14-224 + linear projector (0.42B of ~2.9B; 2048-d)"),
    _entry("internvl3-1b", "OpenGVLab/InternVL3-1B-hf", 1024, 24, 448, _INET,
           "InternVL3 1B: InternViT-300M/14-448 + pixel shuffle + MLP projector (0.31B of ~0.94B; 896-d)"),
    _entry("internvl3-8b", "OpenGVLab/InternVL3-8B-hf", 1024, 24, 448, _INET,
           "InternVL3 8B: InternViT-300M/14-448 + pixel shuffle + MLP projector (0.33B of ~7.9B; 3584-d)"),
]


def _load(name: str, files) -> Backbone:
    src = files.source
    return create_vlm_backbone(name, src.path) if src.is_local else create_vlm_from_hub(name, src.location)


def _tiny(specs) -> dict:
    from .tiny_vlm import TINY_VLM_TYPES, tiny_vlm_backbone

    return {f"tiny-vlm-{t}": (lambda t=t: tiny_vlm_backbone(t)) for t in TINY_VLM_TYPES}


def register_family() -> None:
    """The ``vlm`` family: vision towers of VLM checkpoints (config.json ``model_type`` in
    :data:`VLM_MODEL_TYPES`), vision shards only; the published ones by name."""
    from .registry import BackboneSpec, register_backbone, register_backbone_family

    register_backbone_family(name="vlm", load=_load, tiny=_tiny,
                             build=lambda spec, checkpoint: create_vlm_from_hub(spec.name, spec.arch),
                             detect=lambda files: files.model_type in VLM_MODEL_TYPES,
                             help="vision towers of VLMs (" + ", ".join(VLM_MODEL_TYPES.values()) + ")")
    for kw in VLM_BACKBONE_SPECS:
        register_backbone(BackboneSpec(**kw))
