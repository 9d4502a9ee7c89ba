"""timm ``VisionTransformer`` models (and the timm trunks inside open_clip SigLIP/EVA models)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import Backbone, PreprocessConfig, TokenBlock, VisionTower


def _timm_preprocess(model: nn.Module) -> PreprocessConfig:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    size = img_size[-1] if img_size else cfg.get("input_size", (3, 224, 224))[-1]
    mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    return PreprocessConfig(int(size), mean, std, cfg.get("interpolation", "bicubic"))


class TimmVisionTower(VisionTower):
    """A timm ViT: patch_embed -> _pos_embed -> norm_pre -> blocks -> norm -> pool (token/avg/map) -> fc_norm.

    ``head`` is an optional projection applied after pooling (open_clip's TimmModel head); the classifier head
    of a plain timm model is never used.
    """

    def __init__(self, model: nn.Module, head: nn.Module | None = None,
                 preprocess: PreprocessConfig | None = None) -> None:
        super().__init__()
        if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
            raise NotImplementedError(f"{type(model).__name__} is not a timm VisionTransformer")
        self.model = model
        self.head = head if head is not None else nn.Identity()
        self.width = model.embed_dim
        self.depth = len(model.blocks)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        self.embed_dim = self._head_out_dim()
        self.preprocess = preprocess or _timm_preprocess(model)
        self._blocks = nn.ModuleList(TokenBlock(b) for b in model.blocks)

    def _head_out_dim(self) -> int:
        for head in (self.head, self.model.head):
            linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
            if linears:
                return linears[-1].out_features
        return self.width

    def embed(self, pixels: Tensor) -> Tensor:
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(pixels))))

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self._blocks

    def finalize_tokens(self, tokens: Tensor) -> Tensor:
        return self.head(self.model.head(self.model.fc_norm(self.model.norm(tokens))))

    def finalize(self, tokens: Tensor) -> Tensor:
        # the trunk's own head is Identity for plain models (num_classes=0) and the projection in open_clip's
        # TimmModel when it has no separate head
        return self.head(self.model.forward_head(self.model.norm(tokens)))

    def reference_forward(self, pixels: Tensor) -> Tensor:
        return self.head(self.model(pixels))


class RopeBlock(nn.Module):
    """A timm EVA block called with the rotary embedding of the current input size. Tokens beyond the rope's
    length (learnable queries appended after the patches) get the identity rotation (sin 0, cos 1)."""

    def __init__(self, block: nn.Module, tower: TimmEvaVisionTower) -> None:
        super().__init__()
        self.block = block
        self._tower = [tower]  # a list, so the tower is not registered as a submodule (no cycle)

    def forward(self, tokens: Tensor) -> Tensor:
        tower = self._tower[0]
        rope = tower.rope
        if rope is not None:
            extra = tokens.shape[1] - tower.num_prefix_tokens - rope.shape[-2]
            if extra > 0:
                half = rope.shape[-1] // 2
                ident = torch.cat([rope.new_zeros(extra, half), rope.new_ones(extra, half)], dim=-1)
                rope = torch.cat([rope, ident.expand(*rope.shape[:-2], extra, 2 * half)], dim=-2)
        return self.block(tokens, rope=rope)


class TimmEvaVisionTower(TimmVisionTower):
    """timm ``Eva`` models (EVA-02 / EVA-CLIP trunks) with rotary position embeddings."""

    def __init__(self, model: nn.Module, head: nn.Module | None = None,
                 preprocess: PreprocessConfig | None = None) -> None:
        super().__init__(model, head, preprocess)
        if getattr(model, "rope_mixed", False):
            raise NotImplementedError("timm EVA models with depth-mixed rotary embeddings are not supported")
        self.rope: Tensor | None = None
        self._blocks = nn.ModuleList(RopeBlock(b, self) for b in model.blocks)

    def embed(self, pixels: Tensor) -> Tensor:
        x, self.rope = self.model._pos_embed(self.model.patch_embed(pixels))
        return self.model.norm_pre(x)


def timm_vision_tower(model: nn.Module, head: nn.Module | None = None,
                      preprocess: PreprocessConfig | None = None) -> TimmVisionTower:
    """The right tower class for a timm model (rotary EVA or plain ViT)."""
    cls = TimmEvaVisionTower if hasattr(model, "rope") else TimmVisionTower
    return cls(model, head, preprocess)


def create_timm_vit(name: str, arch: str, pretrained: bool = False, **kwargs) -> Backbone:
    """Build a timm ViT (``arch`` may be ``hf-hub:...`` or ``local-dir:...``) without its classifier."""
    import timm

    model = timm.create_model(arch, pretrained=pretrained, num_classes=0, **kwargs)
    return Backbone(name, timm_vision_tower(model))


# ------------------------------------------------------------------------------------------------ registry entries
def _build(spec, checkpoint: str | None) -> Backbone:
    return create_timm_vit(spec.name, spec.arch, pretrained=True)


def _detect(files) -> bool:
    """timm's hub/folder layout: a config.json with ``architecture`` and no transformers ``model_type``."""
    cfg = files.config()
    return "architecture" in cfg and "model_type" not in cfg


def _tiny(specs) -> dict:
    from .tiny import tiny_timm_vit

    return {"tiny-timm-vit": lambda: tiny_timm_vit(),
            "tiny-timm-vit-avgpool": lambda: tiny_timm_vit(global_pool="avg", class_token=False)}


def register_family() -> None:
    """The ``timm`` family: timm ViTs by name and any timm repo or folder (config.json with ``architecture``)."""
    from .registry import BackboneSpec, register_backbone, register_backbone_family

    register_backbone_family(name="timm", build=_build, detect=_detect, tiny=_tiny,
                             load=lambda name, files: create_timm_vit(name, files.source.uri, pretrained=True),
                             help="timm ViTs; repos/folders whose config.json names an architecture")
    register_backbone(BackboneSpec("vit-b-16-augreg", "timm", "hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
                                   768, 12, 224, (0.5,) * 3, (0.5,) * 3, False, "timm ViT-B/16 (ImageNet-21k augreg)",
                                   arch="vit_base_patch16_224.augreg2_in21k_ft_in1k"))
