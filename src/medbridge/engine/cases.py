"""Training and scoring when the unit is a case of several images (``data.unit: case``), for any method.

The frozen-activation cache stays per image. Two rules, chosen by the method's declared capability
``Method.case_views`` (the engine never names a method):

- ``case_views = True``: a case is ONE input whose views are the views of all its images, concatenated in image
  order (:class:`CaseCache`); the method's own view pooling combines them (MedBridge: view self-attention, then
  max-pooling). A case with fewer images than the largest case repeats its images cyclically to fill the slots
  (max-pooling ignores repeats; a case of one image gives exactly the one-image result).
- otherwise: each image is trained with its case's labels, and a case's score is the sigmoid of the mean of its
  images' logits (:func:`case_scores`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..data.cases import CaseTable, mean_logit
from ..methods.api import Method, TrainingData


class CaseCache:
    """A per-image cache read per case: ``read(case_rows)`` gives every entry as [B, K * n_views, ...] (the views
    of the case's K image slots in order). ``done()`` is per case: at least one readable image."""

    def __init__(self, cache: Any, table: CaseTable) -> None:
        self.images, self.table = cache, table
        image_done = cache.done()
        members = table.members
        present = (members >= 0) & image_done[np.where(members >= 0, members, 0)]
        self._done = present.any(axis=1)
        self.slots = np.empty_like(members)  # each case's slots filled cyclically with its readable images
        for c in range(len(members)):
            rows = members[c][present[c]] if self._done[c] else members[c][members[c] >= 0]
            self.slots[c] = np.resize(rows, members.shape[1])
        self.arrays = getattr(cache, "arrays", {})  # names of what is stored (methods check which tensors exist)
        self.n_rows = len(table)
        self.mode = getattr(cache, "mode", None)

    def done(self) -> np.ndarray:
        return self._done.copy()

    def read(self, rows: np.ndarray, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        rows = np.asarray(rows, dtype=int)
        k = self.slots.shape[1]
        flat = self.slots[rows].reshape(-1)
        values = self.images.read(flat, names) if names is not None else self.images.read(flat)
        out = {}
        for name, t in values.items():
            t = t.reshape(len(rows), k, *t.shape[1:])  # [B, K, n_views, ...]
            out[name] = t.flatten(1, 2)
        return out


def is_cases(table: Any) -> bool:
    return isinstance(table, CaseTable)


def training_data(method: Method, table: Any, cache: Any, train_rows: np.ndarray,
                  val_rows: np.ndarray) -> TrainingData:
    """What ``method`` is fitted on: per image, per case through its views, or per image with its case's labels."""
    if not is_cases(table):
        return TrainingData(cache, table.targets, train_rows, val_rows, table.reports)
    if method.case_views:
        return TrainingData(CaseCache(cache, table), table.targets, train_rows, val_rows, table.reports)
    done = cache.done()
    image_rows = [r[done[r]] for r in (table.image_rows(train_rows), table.image_rows(val_rows))]
    return TrainingData(cache, table.image_targets(), *image_rows, table.images.reports)


def case_scores(method: Method, table: Any, cache: Any, rows: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Scores [len(rows), L] of ``rows`` (images, or cases of a :class:`CaseTable` by the method's rule)."""
    if not is_cases(table):
        return method.scores_cached(cache, rows, device)
    if method.case_views:
        return method.scores_cached(CaseCache(cache, table), rows, device)
    done = cache.done()
    members = table.members[np.asarray(rows, dtype=int)]
    usable = (members >= 0) & done[np.where(members >= 0, members, 0)]
    flat = members[usable]
    per_image = method.scores_cached(cache, flat, device) if len(flat) else np.zeros((0, len(method.labels)))
    owner = np.repeat(np.arange(len(rows)), usable.sum(axis=1))
    out = np.full((len(rows), per_image.shape[1] if len(flat) else len(method.labels)), np.nan, dtype=np.float32)
    for i in range(len(rows)):
        if usable[i].any():
            out[i] = mean_logit(per_image[owner == i])
    return out


def usable_rows(table: Any, cache: Any, rows: np.ndarray) -> np.ndarray:
    """``rows`` (images or cases) that can be scored: readable images; cases with at least one readable image."""
    rows = np.asarray(rows, dtype=int)
    done = CaseCache(cache, table).done() if is_cases(table) else cache.done()
    return rows[done[rows]]


def image_rows_for(table: Any, rows: np.ndarray) -> np.ndarray:
    """The image rows whose frozen activations ``rows`` need (the rows themselves for an image table)."""
    return table.image_rows(rows) if is_cases(table) else np.asarray(rows)


def image_table(table: Any):
    """The image table under ``table`` (itself for an image table)."""
    return table.images if is_cases(table) else table
