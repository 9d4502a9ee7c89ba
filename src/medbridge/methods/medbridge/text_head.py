"""Label prompts through a frozen text tower, then a learnable projection to the image embedding width."""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from ...backbones.base import TextTower
from ..prompts import DEFAULT_TEMPLATE

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")


def text_capacity(text: TextTower) -> int:
    """The most tokens the tower reads at once, special tokens included (longer text is truncated)."""
    n = getattr(text, "max_length", None)
    return int(n) if n else int(text.tokenize([""]).input_ids.shape[1])


def token_count(text: TextTower, piece: str) -> int:
    """Tokens the tower reads for ``piece`` (padding not counted; at most its capacity)."""
    tokens = text.tokenize([piece])
    pad = getattr(getattr(text, "tokenizer", None), "pad_token_id", None)  # SigLIP: mask all ones, padded ids
    return int((tokens.input_ids != pad).sum() if pad is not None else tokens.attention_mask.sum())


def chunk_text(text: str, fits) -> list[str]:
    """Consecutive pieces of ``text`` that each ``fits(piece)`` (the tower reads it whole): whole sentences packed
    greedily, a sentence too long alone split between words. A text that fits is one piece; joined with spaces the
    pieces give the text's words in order (nothing is dropped, except inside a single over-long word)."""
    text = " ".join(text.split())
    if fits(text):
        return [text]
    units = []
    for sentence in _SENTENCE_END.split(text):
        units += [sentence] if fits(sentence) else sentence.split()
    pieces, current = [], ""
    for unit in units:
        candidate = f"{current} {unit}" if current else unit
        if current and not fits(candidate):
            pieces.append(current)
            candidate = unit
        current = candidate
    return pieces + [current] if current else pieces


class LabelTextHead(nn.Module):
    """Prompts -> frozen text tower (pooled the tower's way, before its own projection) -> learnable Linear.

    The Linear starts from the model's own text projection when it has one of the right shape (a CLIP then
    starts at its zero-shot alignment), else from the identity when widths match, else a default init. Frozen
    text features are cached per prompt list: they only change through the projection."""

    def __init__(self, text: TextTower, out_dim: int, template: str = DEFAULT_TEMPLATE) -> None:
        super().__init__()
        if "{}" not in template:
            raise ValueError(f"prompt template must contain '{{}}' for the class name, got {template!r}")
        self.text = text
        self.template = template
        self.proj = nn.Linear(text.width, out_dim)
        own = text.projection_weight()
        with torch.no_grad():
            if own is not None and tuple(own[0].shape) == (out_dim, text.width):
                self.proj.weight.copy_(own[0])
                self.proj.bias.copy_(own[1] if own[1] is not None else torch.zeros(out_dim))
                self.init = "model text projection"
            elif text.width == out_dim:
                self.proj.weight.copy_(torch.eye(out_dim))
                self.proj.bias.zero_()
                self.init = "identity"
            else:
                self.init = "random"
        self._cache: dict[tuple[str, ...], Tensor] = {}

    def prompts(self, names: list[str]) -> list[str]:
        return [self.template.format(n) for n in names]

    def frozen_features(self, texts: list[str]) -> Tensor:
        """Pooled frozen features [len(texts), width]; cached for label prompts."""
        key = tuple(texts)
        device = self.proj.weight.device
        if key not in self._cache or self._cache[key].device != device:  # re-encode after .to(device)
            with torch.no_grad():
                self._cache[key] = self.text.encode_text(list(texts)).pooled.detach().to(device)
        return self._cache[key]

    def report_chunks(self, text: str) -> list[str]:
        """``text`` in pieces the frozen tower reads whole (:func:`chunk_text`)."""
        capacity = text_capacity(self.text)
        return chunk_text(text, lambda t: token_count(self.text, t) < capacity)

    def encode_uncached(self, texts: list[str]) -> Tensor:
        """Projected features of free text (e.g. reports), not cached. A text longer than the tower's maximum
        length is chunked, not truncated: its pieces are encoded and their pooled features averaged."""
        pieces = [self.report_chunks(t) for t in texts]
        with torch.no_grad():
            pooled = self.text.encode_text([p for ps in pieces for p in ps]).pooled
        counts = torch.tensor([len(ps) for ps in pieces], device=pooled.device)
        owner = torch.repeat_interleave(torch.arange(len(texts), device=pooled.device), counts)
        mean = torch.zeros(len(texts), pooled.shape[1], dtype=pooled.dtype, device=pooled.device)
        mean = mean.index_add_(0, owner, pooled) / counts[:, None].to(pooled.dtype)
        return self.proj(mean)

    def forward(self, names: list[str]) -> Tensor:
        """Readable class names -> projected label embeddings [L, out_dim]."""
        if not names:
            raise ValueError("the label list is empty")
        return self.proj(self.frozen_features(self.prompts(names)))
