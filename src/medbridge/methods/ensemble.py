"""Seed ensembles of any method: N members of one method, built and trained with N training seeds, scored by
averaging their probabilities, saved as one file.

``train.ensemble: N`` in a run's config wraps each of its seed-dependent methods (``Method.seed_dependent``);
``train.ensemble: {method: N}`` only the methods named.
Member 0 is built and trained exactly like a single run with ``train.seed``; member i >= 1 draws its
initialisation after ``torch.manual_seed(seed + i)`` and trains with seed + i (its own batch order). The engine
fits the members one after another (each in its own checkpoint folder, so an interrupted ensemble resumes); the
saved ``adapter.json`` names the member method and ``"ensemble": N``; the tensors carry a ``member{i}.`` prefix.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .api import CacheSpec, Explainable, FitsMembers, Method, NotApplicableError, TextPrompted, TrainingData


class SeedEnsemble(FitsMembers, Method):
    """Members of one method, with the same backbones, labels and views; scores = mean of their probabilities.

    An ensemble has the capabilities of its members (:class:`TextPrompted`, :class:`Explainable`): ``SeedEnsemble(
    members)`` builds the subclass that declares the members' ones."""

    def __new__(cls, members: list[Method] | None = None) -> SeedEnsemble:  # None: copy.deepcopy
        if cls is SeedEnsemble and members:
            cls = _with_capabilities(tuple(c for c in _CAPABILITIES if isinstance(members[0], c)))
        return super().__new__(cls)

    def __init__(self, members: list[Method]) -> None:
        if len(members) < 2:
            raise ValueError(f"a seed ensemble needs at least 2 members, got {len(members)}")
        first = members[0]
        if any(type(m) is not type(first) or m.labels != first.labels for m in members):
            raise ValueError("the members of a seed ensemble must be one method with one label list")
        super().__init__(first.options, first.backbones, first.labels, first.prompt_names, first.focal)
        self.members = nn.ModuleList(members)
        self.name = first.name  # the member method: what configs, run folders and saved files name
        self.case_views = first.case_views

    @property
    def size(self) -> int:
        return len(self.members)

    def folder(self) -> str:  # type: ignore[override]  # the member method's folder, on the instance
        return type(self.members[0]).folder()

    # -- cache and fitting (the engine fits each member on its own: engine/trainer.py)
    def cache_spec(self, n_views: int) -> CacheSpec:
        return self.members[0].cache_spec(n_views)

    def reads(self, spec: CacheSpec, n_views: int) -> bool:
        return self.members[0].reads(spec, n_views)

    def prepare(self, data: TrainingData) -> None:
        for m in self.members:
            m.prepare(data)

    # -- scoring
    def scores_cached(self, cache: Any, rows: np.ndarray, device: str = "cpu") -> np.ndarray:
        return np.mean([m.scores_cached(cache, rows, device) for m in self.members], axis=0)

    def scores_views(self, pixels: list[Tensor]) -> tuple[np.ndarray, dict]:
        outs = [m.scores_views(pixels) for m in self.members]
        details = {k: np.mean([d[k] for _, d in outs], axis=0) for k in outs[0][1]
                   if all(isinstance(d.get(k), np.ndarray) and d[k].shape == outs[0][1][k].shape for _, d in outs)}
        return np.mean([s for s, _ in outs], axis=0), details

    # -- saved
    def saved_options(self) -> dict:
        return self.members[0].saved_options()

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {f"member{i}.{k}": p for i, m in enumerate(self.members) for k, p in m.trainable_parameters().items()}

    def state_tensors(self) -> dict[str, Tensor]:
        return {f"member{i}.{k}": t for i, m in enumerate(self.members) for k, t in m.state_tensors().items()}

    def backbone_fingerprints(self) -> list[dict]:
        return self.members[0].backbone_fingerprints()

    def info(self) -> dict:
        return {"members": [m.info() for m in self.members]}  # the size is adapter.json's "ensemble"

    def restore_info(self, info: dict) -> None:
        for m, i in zip(self.members, info.get("members", [])):
            m.restore_info(i)


class _TextPromptedEnsemble(TextPrompted):
    """The members' prompts, each member scoring the new label names."""

    def with_label_names(self, labels: list[str], prompt_names: list[str]) -> SeedEnsemble:
        return SeedEnsemble([m.with_label_names(labels, prompt_names) for m in self.members])  # type: ignore[attr-defined]


class _ExplainableEnsemble(Explainable):
    """Explanations of the members' mean logits."""

    def explain_top_block(self, expert: int) -> int:
        return min(m.explain_top_block(expert) for m in self.members)  # type: ignore[attr-defined]

    def logits_from_tokens(self, tokens: list[Tensor], layers: list[int], b: int, n: int) -> Tensor:
        """The members' mean logits (the explained quantity of an ensemble), from tokens of the shared towers."""
        members = self.members  # type: ignore[attr-defined]
        shared = all(x is y for m in members for x, y in zip(m.backbones, self.backbones))  # type: ignore[attr-defined]
        if not shared:  # e.g. fine-tuned towers: member 0's tokens are not the other members' tokens
            raise NotApplicableError(f"explanations of a {self.name} ensemble: its members run their own tuned "  # type: ignore[attr-defined]
                                     "towers; explain one member's saved model instead (train with train.ensemble=1)")
        return torch.stack([m.logits_from_tokens(tokens, layers, b, n) for m in members]).mean(0)


#: capability -> the ensemble's implementation of it
_CAPABILITIES: dict[type, type] = {TextPrompted: _TextPromptedEnsemble, Explainable: _ExplainableEnsemble}
_CLASSES: dict[tuple[type, ...], type[SeedEnsemble]] = {}


def _with_capabilities(capabilities: tuple[type, ...]) -> type[SeedEnsemble]:
    """The SeedEnsemble subclass declaring ``capabilities`` (made once per combination)."""
    if capabilities not in _CLASSES:
        mixins = tuple(_CAPABILITIES[c] for c in capabilities)
        _CLASSES[capabilities] = type("SeedEnsemble", (*mixins, SeedEnsemble), {"__doc__": SeedEnsemble.__doc__,
                                                                              "__module__": __name__})
    return _CLASSES[capabilities]


def build_members(build: Any, size: int, seed: int) -> list[Method]:
    """``size`` members from ``build()`` (no arguments -> a new untrained member): member 0 with the random state
    as it is (exactly a single run's), member i >= 1 after ``torch.manual_seed(seed + i)``."""
    members = []
    for i in range(size):
        if i:
            torch.manual_seed(seed + i)
        members.append(build())
    return members


__all__ = ["SeedEnsemble", "build_members"]
