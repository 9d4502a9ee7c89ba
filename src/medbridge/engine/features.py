"""Filling the frozen-activation cache for a table of images (data-parallel across ranks when launched so)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from ..backbones.base import PreprocessConfig
from ..backbones.loading import cache_dir
from ..data.focal import FocalConfig
from ..data.loader import ViewDataset, collate_views
from ..data.table import DatasetError, ImageTable
from .cache import FeatureCache, image_keys
from .distributed import barrier, world

log = logging.getLogger(__name__)


@dataclass
class CacheSpec:
    """What to cache for a method: key parts, per-image shapes, and the function computing it from views."""

    parts: dict
    shapes: dict[str, tuple[int, ...]]
    compute: Callable[[list[Tensor]], dict[str, Tensor]]
    focal: FocalConfig
    preprocess: list[PreprocessConfig]


def default_cache_root() -> Path:
    return cache_dir() / "features"


def fixed_view_count(table: ImageTable, focal: FocalConfig) -> int:
    """Number of views per image; the cache needs it to be the same for every image (checked on headers)."""
    from PIL import Image

    counts = {}
    for p in table.paths[: min(len(table), 64)]:
        try:
            with Image.open(p) as im:
                w, h = im.size
        except Exception:
            continue  # DICOM or unreadable: checked when decoded
        counts.setdefault(focal.max_views(h, w), p)
    if len(counts) > 1:
        (n1, p1), (n2, p2) = list(counts.items())[:2]
        raise DatasetError(f"images give different numbers of focal views ({n1} for {p1}, {n2} for {p2}): the "
                           "cache needs a fixed count: set model.focal.num_crops (and a fractional region_size)")
    return next(iter(counts)) if counts else focal.max_views(1024, 1024)


def build_cache(spec: CacheSpec, table: ImageTable, rows: np.ndarray | None = None, *, root: str | Path | None = None,
                batch_size: int = 16, workers: int = 2, device: str = "cpu", amp: bool = True,
                skip_unreadable: bool = False, progress: bool = True) -> FeatureCache:
    """Compute the cache rows of ``rows`` (default all) that are not done yet; returns the cache."""
    rank, size = world()
    root = Path(root) if root else default_cache_root()
    parts = {**spec.parts, "images": image_keys(table.paths)}
    if rank == 0 and size > 1:  # create the files before the other ranks open them
        FeatureCache(root, parts, len(table), spec.shapes)
    barrier()
    cache = FeatureCache(root, parts, len(table), spec.shapes, rank=rank)
    rows = np.arange(len(table)) if rows is None else np.asarray(rows)
    todo = np.setdiff1d(rows, np.flatnonzero(cache.done()))[rank::size]
    if len(todo):
        ds = ViewDataset(table, spec.focal, spec.preprocess, train=False, skip_unreadable=skip_unreadable)
        loader = DataLoader(Subset(ds, todo.tolist()), batch_size=batch_size, num_workers=workers,
                            collate_fn=collate_views, persistent_workers=False)
        use_amp = amp and device.startswith("cuda")
        skipped = 0
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"caching frozen activations ({cache.bytes / 2**30:.1f} GiB)",
                   unit="img", disable=not progress or rank != 0, dynamic_ncols=True)
        for batch in loader:
            skipped += batch["skipped"]
            if len(batch["index"]):
                n = batch["pixels"][0].shape[1]
                expected = spec.shapes[next(iter(spec.shapes))][0]
                if n != expected:
                    bad = table.paths[int(batch["index"][0])]
                    raise DatasetError(f"{bad}: {n} focal views, the cache was sized for {expected}; set "
                                       "model.focal.num_crops so every image gives the same number of views")
                pixels = [p.to(device) for p in batch["pixels"]]
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                    values = spec.compute(pixels)
                idx = batch["index"].numpy()
                cache.write(idx, values)
                cache.mark_done(idx)
            bar.update(len(batch["index"]) + batch["skipped"])
        bar.close()
        if skipped:
            log.warning("%d unreadable image(s) skipped while caching (see warnings above for the files)", skipped)
    barrier()
    return cache


def cache_root_from(path: str | None) -> Path:
    return Path(path) if path else Path(os.environ.get("MEDBRIDGE_FEATURE_CACHE", default_cache_root()))
