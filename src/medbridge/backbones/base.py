"""The frozen-backbone interface every method builds on.

A backbone is a vision tower (always) plus an optional text tower. Methods never touch a library's internals:
they call ``embed`` -> ``blocks[i]`` one at a time -> ``finalize`` on the vision side, and ``tokenize`` ->
``encode`` (or ``token_embeddings`` -> ``encode_embeddings`` for prompt learning) on the text side.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class PreprocessConfig:
    """How pixels must be prepared for a vision tower (what timm calls the pretrained config)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)


class FrozenModule(nn.Module):
    """A pretrained tower that stays in eval mode (dropout off) whatever its parent's mode, while ``frozen``.

    Methods call ``model.train()`` on modules that contain frozen towers; without this, a text tower's dropout
    would be on while label features are computed and cached. A method that fine-tunes a tower sets
    ``tower.frozen = False`` first."""

    frozen: bool = True

    def train(self, mode: bool = True) -> FrozenModule:
        return super().train(mode and not self.frozen)


class TokenBlock(nn.Module):
    """Wraps one transformer block of a library so that ``block(tokens) -> tokens`` ([B, L, D] both ways)."""

    def __init__(self, block: nn.Module, call: str = "plain") -> None:
        super().__init__()
        self.block = block
        self.call = call

    def forward(self, tokens: Tensor) -> Tensor:
        if self.call == "hf_clip":  # CLIPEncoderLayer(hidden, attention_mask, causal_attention_mask)
            out = self.block(tokens, None, None)
        elif self.call == "hf_siglip":  # SiglipEncoderLayer(hidden, attention_mask)
            out = self.block(tokens, None)
        else:
            out = self.block(tokens)
        return out[0] if isinstance(out, tuple) else out


class VisionTower(FrozenModule, ABC):
    """A frozen ViT-style image encoder, exposed block by block.

    Attributes set by every implementation: ``width`` (token width), ``depth`` (number of blocks),
    ``num_prefix_tokens`` (CLS + registers before the patch tokens), ``embed_dim`` (width of ``finalize``'s
    output), ``preprocess`` (:class:`PreprocessConfig`).
    """

    width: int
    depth: int
    num_prefix_tokens: int
    embed_dim: int
    preprocess: PreprocessConfig

    @abstractmethod
    def embed(self, pixels: Tensor) -> Tensor:
        """Pixels [B, 3, H, W] (already normalised) -> tokens [B, L, width] with positions applied."""

    @property
    @abstractmethod
    def blocks(self) -> Sequence[nn.Module]:
        """The transformer blocks, each mapping tokens [B, L, width] -> [B, L, width]."""

    @abstractmethod
    def finalize_tokens(self, tokens: Tensor) -> Tensor:
        """Per-token final norm and projection (where the model has one): [B, L, width] -> [B, L, embed_dim]."""

    @abstractmethod
    def finalize(self, tokens: Tensor) -> Tensor:
        """Output tokens of the last block -> the model's own pooled image embedding [B, embed_dim]."""

    @abstractmethod
    def reference_forward(self, pixels: Tensor) -> Tensor:
        """The library's own full forward to the pooled embedding (used by tests to check the split)."""

    def run_blocks(self, tokens: Tensor, start: int = 0, end: int | None = None) -> Tensor:
        """Run blocks ``start .. end-1`` (0-based, end exclusive) on tokens."""
        for block in list(self.blocks)[start:end]:
            tokens = block(tokens)
        return tokens

    def forward(self, pixels: Tensor) -> Tensor:
        return self.finalize(self.run_blocks(self.embed(pixels)))


@dataclass
class TextTokens:
    """Tokenized text: ids [B, L] and attention mask [B, L] (1 = real token)."""

    input_ids: Tensor
    attention_mask: Tensor

    def to(self, device: torch.device | str) -> TextTokens:
        return TextTokens(self.input_ids.to(device), self.attention_mask.to(device))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class TextFeatures:
    """Pooled text features before (``pooled``, width) and after (``projected``, embed_dim) the projection."""

    pooled: Tensor
    projected: Tensor


class TextTower(FrozenModule, ABC):
    """A frozen text encoder with the model's own pooling.

    ``width`` is the hidden width, ``embed_dim`` the width after the model's text projection (equal to ``width``
    when there is none), ``pooling`` names how the model pools (argmax/eos/last/first/mean).
    """

    width: int
    embed_dim: int
    pooling: str

    @abstractmethod
    def tokenize(self, texts: list[str]) -> TextTokens:
        """Strings -> :class:`TextTokens` on the tower's device."""

    @abstractmethod
    def token_embeddings(self, tokens: TextTokens) -> Tensor:
        """Word embeddings [B, L, width] (no positions): what prompt learners replace."""

    @abstractmethod
    def encode_embeddings(self, embeddings: Tensor, tokens: TextTokens) -> TextFeatures:
        """Run the encoder from word embeddings; ``tokens`` gives positions to pool at and the padding mask."""

    @abstractmethod
    def reference_encode(self, tokens: TextTokens) -> Tensor:
        """The library's own encode-text (projected), used by tests."""

    def projection_weight(self) -> tuple[Tensor, Tensor | None] | None:
        """The model's own text projection as (weight [embed_dim, width], bias) or None when it has none."""
        return None

    @property
    def blocks(self) -> Sequence[nn.Module]:
        """The transformer blocks (for hooks, e.g. MMA's adapters); towers that do not expose them raise."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its blocks")

    def encode(self, tokens: TextTokens) -> TextFeatures:
        return self.encode_embeddings(self.token_embeddings(tokens), tokens)

    def encode_text(self, texts: list[str]) -> TextFeatures:
        return self.encode(self.tokenize(texts))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class Backbone(nn.Module):
    """A vision tower with an optional text tower, frozen by default.

    ``name`` is what the user asked for (registry name or source string); ``logit_scale`` is the model's own
    contrastive temperature where it has one (exp'd value), else None.
    """

    def __init__(self, name: str, vision: VisionTower, text: TextTower | None = None,
                 logit_scale: float | None = None, aligned: bool = False) -> None:
        super().__init__()
        self.name = name
        self.vision = vision
        self.text = text
        self.logit_scale = logit_scale
        # aligned: the text tower was trained contrastively with this vision tower (zero-shot makes sense)
        self.aligned = aligned
        self.freeze()

    def freeze(self) -> Backbone:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()
        return self

    def train(self, mode: bool = True) -> Backbone:
        """Frozen backbones stay in eval mode (dropout off) whatever the caller's mode."""
        return super().train(False)

    @property
    def has_text(self) -> bool:
        return self.text is not None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def describe(self) -> dict:
        v = self.vision
        return {
            "name": self.name, "vision_width": v.width, "depth": v.depth, "embed_dim": v.embed_dim,
            "num_prefix_tokens": v.num_prefix_tokens, "preprocess": v.preprocess.to_dict(),
            "text_width": self.text.width if self.text else None,
            "text_embed_dim": self.text.embed_dim if self.text else None,
            "parameters": self.num_parameters(),
        }


def backbone_fingerprint(backbone: Backbone) -> dict:
    """Architecture facts plus a checksum of a few frozen weights: tells one backbone from another (saved with
    every trained method and checked when it is loaded; part of the frozen-activation cache key)."""
    v = backbone.vision
    with torch.no_grad():
        params = list(v.parameters())
        probe = [params[0], params[len(params) // 2], params[-1]]
        checksum = float(sum(p.detach().cpu().double().abs().sum() for p in probe))  # same on any device
    return {"name": backbone.name, "width": v.width, "depth": v.depth, "embed_dim": v.embed_dim,
            "image_size": v.preprocess.image_size, "checksum": round(checksum, 3)}
