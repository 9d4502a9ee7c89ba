"""Backbone registry: families (how a kind of model is built and recognised) and named backbones, and the one
factory, :func:`create_backbone`.

A **family** (:class:`BackboneFamily`, :func:`register_backbone_family`) knows how to build one library's models:
its registered entries (``build``), the hub repos / folders it recognises (``detect`` + ``load``), text-only
sources (``text``), offline availability and tiny random copies for tests. A **backbone** (:class:`BackboneSpec`,
:func:`register_backbone`) is a named entry of a family with its default weights. Source strings are parsed
once by :func:`~medbridge.backbones.source.parse_source` (forms: that module's docstring).

Registration is explicit: the families and backbones that ship with medbridge register themselves through
``register_family()`` functions beside their code, called by :func:`register_builtin_backbones` on first use of
the registry; plugins call the same functions (``MEDBRIDGE_PLUGINS=module:function``). Guide:
docs/adding-a-backbone.md.
"""

from __future__ import annotations

import difflib
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..defaults import DEFAULT_BACKBONE  # defined without torch, for the command line
from .base import Backbone, TextTower
from .loading import BackboneError, hub_unreachable, is_hub_error
from .source import BUNDLED, HUB, LOCAL, NAME, PAIR, Source, parse_source

TinyBuilders = dict[str, Callable[[], Backbone]]


@dataclass(frozen=True)
class BackboneSpec:
    """One registered backbone: what it is, where its weights come from, how to build it (and a tiny copy)."""

    name: str
    family: str  # a registered family: open_clip | transformers | timm | bundled | vlm | your own
    source: str  # default weights (shown to users)
    vision_width: int | None
    depth: int | None
    image_size: int | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    has_text: bool
    description: str
    arch: str = ""  # library architecture name (or hub id)
    pretrained: str | None = None  # open_clip pretrained tag
    needs_checkpoint: bool = False  # weights only from a user-supplied file (e.g. CheXzero)
    text_only: bool = False
    extra: dict = field(default_factory=dict)
    aligned: bool = False  # the text tower was trained contrastively with the vision tower (zero-shot works)
    licence: str = ""  # the weights' licence or terms, as their publisher states it
    tiny: Callable[[], Backbone] | None = field(default=None, compare=False, repr=False)  # a tiny random copy

    @property
    def hub_repo(self) -> str | None:
        """The Hugging Face repo of the default weights, when they come from the hub."""
        src = parse_source(self.source)
        return src.location if src.kind == HUB else None


def hub_availability(spec: BackboneSpec) -> str:
    """Availability of hub weights: in the local hub cache or not (or a checkpoint file is needed)."""
    if spec.needs_checkpoint:
        return "needs checkpoint file (NAME@/path)"
    if spec.hub_repo is None:
        return "unknown (weights not from the hub)"
    return "yes (hub cache)" if _hf_cached(spec.hub_repo) else "no (hub download; offline: use local-dir: or NAME@file)"


@dataclass(frozen=True)
class ModelFiles:
    """What a ``hf-hub:`` repo or ``local-dir:`` folder holds: its file names, and its ``config.json`` read on
    first use (``{}`` when there is none). Families' ``detect`` functions look at this."""

    source: Source
    names: frozenset[str]
    _config: dict = field(default_factory=dict, compare=False, repr=False)

    def config(self) -> dict:
        if "config.json" not in self.names:
            return {}
        if "value" not in self._config:
            if self.source.is_local:
                text = (self.source.path / "config.json").read_text()
            else:
                from huggingface_hub import hf_hub_download

                text = Path(hf_hub_download(self.source.location, "config.json")).read_text()
            self._config["value"] = json.loads(text)
        return self._config["value"]

    @property
    def model_type(self) -> str | None:
        return self.config().get("model_type")


@dataclass(frozen=True)
class BackboneFamily:
    """How one kind of model becomes a :class:`Backbone`.

    - ``build(spec, checkpoint)``: a registered entry of this family (``checkpoint``: the file of ``NAME@FILE``,
      or None; only families with ``checkpoints=True`` are given one)
    - ``detect(files) -> bool`` and ``load(name, files)``: the ``hf-hub:`` / ``local-dir:`` models it
      recognises (tried by descending ``priority``, then registration order; a catch-all uses a low priority)
    - ``text(spec_or_files) -> TextTower | None``: a text tower alone from a text-only registered entry or
      recognised folder/repo (None: it is not text-only; the backbone's own text tower is used)
    - ``tiny(specs) -> {name: builder}``: tiny random-init copies for tests (``specs``: this family's entries)
    - ``available(spec) -> str``: whether an entry's weights can be used offline right now
    """

    name: str
    build: Callable[[BackboneSpec, str | None], Backbone]
    detect: Callable[[ModelFiles], bool] | None = None
    load: Callable[[str, ModelFiles], Backbone] | None = None
    text: Callable[[BackboneSpec | ModelFiles], TextTower | None] | None = None
    tiny: Callable[[list[BackboneSpec]], TinyBuilders] | None = None
    available: Callable[[BackboneSpec], str] = hub_availability
    checkpoints: bool = False
    priority: int = 0
    help: str = ""


_FAMILIES: dict[str, BackboneFamily] = {}
_REGISTRY: dict[str, BackboneSpec] = {}
_BUILTINS_LOADED = False


def _ensure_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        from .builtin import register_builtin_backbones

        register_builtin_backbones()


def register_backbone_family(family: BackboneFamily | None = None, /, **fields) -> BackboneFamily:
    """Add a family (a :class:`BackboneFamily`, or its fields as keywords: ``name``, ``build``, ``detect``,
    ``load``, ``text``, ``tiny``, ``available``, ``checkpoints``, ``priority``, ``help``)."""
    _ensure_builtins()
    family = family if family is not None else BackboneFamily(**fields)
    if family.name in _FAMILIES:
        raise ValueError(f"backbone family {family.name!r} is already registered")
    if (family.detect is None) != (family.load is None):
        raise ValueError(f"backbone family {family.name!r}: detect and load go together (both or neither)")
    _FAMILIES[family.name] = family
    return family


def register_backbone(spec: BackboneSpec | None = None, /, **fields) -> BackboneSpec:
    """Add a named backbone (a :class:`BackboneSpec`, or its fields as keywords) of a registered family."""
    _ensure_builtins()
    spec = spec if spec is not None else BackboneSpec(**fields)
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    if spec.family not in _FAMILIES:
        raise ValueError(f"backbone {spec.name!r}: family {spec.family!r} is not registered "
                         f"(registered: {', '.join(_FAMILIES)}); register_backbone_family(...) first")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[BackboneSpec]:
    """Registered backbones, in registration order."""
    _ensure_builtins()
    return list(_REGISTRY.values())


def list_backbone_families() -> list[BackboneFamily]:
    """Registered families, in registration order."""
    _ensure_builtins()
    return list(_FAMILIES.values())


def specs_of(family: str) -> list[BackboneSpec]:
    """The registered backbones of one family."""
    return [s for s in list_backbones() if s.family == family]


def get_spec(name: str) -> BackboneSpec:
    _ensure_builtins()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise BackboneError(f"unknown backbone {name!r}.{hint} Run `medbridge list backbones` for all names, "
                            "or use hf-hub:org/repo, local-dir:/path, bundled:NAME.")
    return _REGISTRY[name]


def get_family(name: str) -> BackboneFamily:
    _ensure_builtins()
    if name not in _FAMILIES:
        close = difflib.get_close_matches(name, list(_FAMILIES), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise BackboneError(f"backbone family {name!r} is not registered{hint} (registered: {', '.join(_FAMILIES)})")
    return _FAMILIES[name]


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
    return get_family(spec.family).available(spec)


# ----------------------------------------------------------------------------------------------- resolution
def _model_files(src: Source) -> ModelFiles:
    if src.is_local:
        if not src.path.is_dir():
            raise BackboneError(f"local-dir: folder not found: {src.path}")
        return ModelFiles(src, frozenset(p.name for p in src.path.iterdir()))
    from huggingface_hub import list_repo_files

    try:
        return ModelFiles(src, frozenset(list_repo_files(src.location)))
    except Exception as exc:
        if is_hub_error(exc):
            raise hub_unreachable(src.raw, exc) from exc
        raise


def detect_family(src: Source) -> tuple[BackboneFamily, ModelFiles]:
    """The family that recognises a ``hf-hub:`` repo or ``local-dir:`` folder, and what it holds."""
    files = _model_files(src)
    ranked = sorted((f for f in list_backbone_families() if f.detect is not None), key=lambda f: -f.priority)
    for family in ranked:
        if family.detect(files):
            return family, files
    where = f"local-dir:{src.path}" if src.is_local else src.raw
    raise BackboneError(f"{where}: no backbone family recognises it; families and what they read: "
                        + "; ".join(f"{f.name} ({f.help})" for f in ranked))


def _registered(src: Source) -> BackboneSpec:
    spec = get_spec(src.name)
    bundled = specs_of(BUNDLED)  # bundled:NAME names an entry of the bundled family
    if src.kind == BUNDLED and spec not in bundled:
        raise BackboneError(f"{spec.name!r} is not bundled; bundled backbones: {', '.join(s.name for s in bundled)}")
    return spec


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
    family = get_family(spec.family)
    if spec.text_only:
        raise BackboneError(f"{spec.name!r} is a text tower only: pair it with a vision backbone, "
                            f"e.g. 'dinov2-small+{spec.name}'")
    if spec.needs_checkpoint and checkpoint is None:
        raise BackboneError(f"{spec.name!r} has no downloadable weights: pass its checkpoint as "
                            f"'{spec.name}@/path/to/weights.pt'")
    if checkpoint is not None and not family.checkpoints:
        checkpointed = sorted(f.name for f in list_backbone_families() if f.checkpoints)
        raise BackboneError(f"checkpoint files are supported for {' and '.join(checkpointed)} architectures; for "
                            f"{spec.name!r} use local-dir:/path/to/saved/model")
    if checkpoint is None and spec.hub_repo:
        _require_hub(spec.name, spec.hub_repo)
    return family.build(spec, checkpoint)


def create_backbone(source: str = DEFAULT_BACKBONE) -> Backbone:
    """Build a frozen :class:`Backbone` from a registry name or a source string (``source`` module docstring)."""
    src = parse_source(source)
    if src.kind == PAIR:
        vision = create_backbone(src.vision.raw)
        return Backbone(src.raw, vision.vision, create_text_tower(src.text.raw), aligned=False)
    try:
        if src.kind in (NAME, BUNDLED):
            return _create_registered(_registered(src), src.checkpoint)
        family, files = detect_family(src)
        return family.load(src.raw, files)
    except BackboneError:
        raise
    except Exception as exc:
        if is_hub_error(exc):
            raise hub_unreachable(src.raw, exc) from exc
        raise


def create_text_tower(source: str) -> TextTower:
    """A text tower alone: a text-only entry (``minilm-l6``), a text-only folder or repo (a sentence encoder), or
    the text tower of any text-capable backbone."""
    src = parse_source(source)
    tower = None
    if src.kind in (NAME, BUNDLED):
        spec = _registered(src)
        family = get_family(spec.family)
        if spec.text_only and family.text is not None:
            tower = family.text(spec)
    elif src.kind in (HUB, LOCAL):
        family, files = detect_family(src)
        tower = family.text(files) if family.text is not None else None
    if tower is not None:
        return tower
    backbone = create_backbone(source)
    if backbone.text is None:
        raise BackboneError(f"backbone {source!r} has no text tower")
    return backbone.text


def tiny_builders() -> TinyBuilders:
    """A tiny random-init builder for every family and registered architecture (tests use these)."""
    builders: TinyBuilders = {}
    for family in list_backbone_families():
        specs = specs_of(family.name)
        if family.tiny is not None:
            builders.update(family.tiny(specs))
        builders.update({f"tiny-{s.name}": s.tiny for s in specs if s.tiny is not None})
    return builders


__all__ = ["BackboneFamily", "BackboneSpec", "ModelFiles", "availability", "create_backbone",
           "create_text_tower", "detect_family", "get_family", "get_spec", "hub_availability",
           "list_backbone_families", "list_backbones", "register_backbone", "register_backbone_family",
           "specs_of", "tiny_builders"]
