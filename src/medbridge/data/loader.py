"""Torch datasets over an :class:`ImageTable`: full-resolution decoding + focal views, unreadable-image policy."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import Dataset

from ..backbones.base import PreprocessConfig
from .focal import FocalConfig, focal_views, read_view_image
from .images import ImageReadError
from .table import ImageTable

log = logging.getLogger(__name__)


class ViewDataset(Dataset):
    """Item i -> {"index", "pixels": [tensor [N, 3, S, S] per expert], "boxes" [N, 4], "target" [L] (NaN =
    unknown)}. Training mode draws random crops (seeded by ``seed``, ``epoch`` and the index, so resumed runs
    see the same views). With ``skip_unreadable`` a corrupt/missing image yields ``None`` (dropped by
    :func:`collate_views`) and a warning naming the file instead of an error."""

    def __init__(self, table: ImageTable, focal: FocalConfig, preprocess: list[PreprocessConfig],
                 train: bool = False, seed: int = 0, skip_unreadable: bool = False) -> None:
        self.table = table
        self.focal = focal
        self.preprocess = list(preprocess)
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.skip_unreadable = skip_unreadable
        self._paths = table.meta["path"].to_numpy()  # the table's own strings: no Path object per row
        self._targets = torch.from_numpy(table.targets)

    def __len__(self) -> int:
        return len(self._paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict | None:
        try:
            image, full_size = read_view_image(self._paths[i], self.focal, self.preprocess)
        except ImageReadError as exc:
            if not self.skip_unreadable:
                raise
            log.warning("skipping unreadable image (row %d): %s", i, exc)
            return None
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.train else None
        views = focal_views(image, self.focal, self.preprocess, train=self.train, rng=rng, full_size=full_size)
        return {"index": i, "pixels": [v.pixels for v in views], "boxes": views[0].boxes,
                "target": self._targets[i]}


def collate_views(items: list[dict | None]) -> dict:
    """Stack items (dropping ``None`` = skipped unreadable images); ``skipped`` counts the dropped ones."""
    kept = [x for x in items if x is not None]
    if not kept:
        return {"index": torch.zeros(0, dtype=torch.long), "pixels": [], "boxes": None,
                "target": torch.zeros(0), "skipped": len(items)}
    n_experts = len(kept[0]["pixels"])
    return {"index": torch.tensor([x["index"] for x in kept]),
            "pixels": [torch.stack([x["pixels"][k] for x in kept]) for k in range(n_experts)],
            "boxes": torch.stack([x["boxes"] for x in kept]),
            "target": torch.stack([x["target"] for x in kept]),
            "skipped": len(items) - len(kept)}
