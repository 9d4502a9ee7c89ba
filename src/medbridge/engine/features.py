"""Filling the frozen-activation cache for a table of images (data-parallel across ranks when launched so), and
choosing what to cache for the disk at hand (``train.cache`` modes, ``train.cache_budget``)."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from ..data.focal import FocalConfig
from ..data.loader import ViewDataset, collate_views
from ..data.table import DatasetError, ImageTable
from ..defaults import CACHE_MODES
from ..io import cache_dir
from ..methods.api import CacheSpec
from .cache import (
    CacheError,
    CacheSpaceError,
    FeatureCache,
    build_lock,
    cache_bytes,
    cache_folder,
    done_mask,
    format_size,
    free_bytes,
    image_keys,
    on_disk_bytes,
    parse_size,
)
from .distributed import barrier, world

log = logging.getLogger(__name__)

MODE_NOTES = {
    "full": "every frozen activation the adapter reads (isolated attention: the inputs of blocks T1+1..T and the "
            "pooled output); fastest to train from",
    "prefix": "the frozen tokens after block T1; blocks T1+1..T of the frozen path rerun at every step",
    "pooled": "the pooled frozen embedding of every view",
    "pixels": "the preprocessed input pixels of every view (fine-tuning: the tower itself trains, so no activation "
              "is frozen; images are not decoded again at every epoch)",
    "none": "nothing stored: images decoded and the whole frozen path rerun at every read (slowest)",
}
DEFAULT_BUDGET_SHARE = 0.8  # of the free space, when train.cache_budget is not set


def stored_kind(spec: CacheSpec) -> str:
    """The mode name of what ``spec`` stores: block states (full), block-T1 tokens (prefix), embeddings (pooled)
    or input pixels."""
    kinds = {name.split(".", 1)[-1] for name in spec.shapes}
    for kind, mode in (("states", "full"), ("prefix", "prefix"), ("pixels", "pixels")):
        if kind in kinds:
            return mode
    return "pooled"


def cache_modes(spec: CacheSpec) -> dict[str, CacheSpec | None]:
    """The modes a method can use, fastest first (``none``: nothing stored)."""
    modes: dict[str, CacheSpec | None] = {stored_kind(spec): spec}
    for name, alt in spec.alternatives.items():
        modes.setdefault(name, alt)
    modes["none"] = None
    return modes


def default_cache_root() -> Path:
    return cache_dir() / "features"


def fixed_view_count(table: ImageTable, focal: FocalConfig) -> int:
    """Number of views per image; the cache needs it to be the same for every image (checked on headers)."""
    from PIL import Image

    counts = {}
    for p in table.meta["path"].iloc[:64]:
        try:
            with Image.open(p) as im:
                w, h = im.size
        except Exception:
            continue  # DICOM or unreadable: checked when decoded
        counts.setdefault(focal.max_views(h, w), p)
    if len(counts) > 1:
        (n1, p1), (n2, p2) = list(counts.items())[:2]
        raise DatasetError(f"images give different numbers of focal views ({n1} for {p1}, {n2} for {p2}): the "
                           "cache needs a fixed count: set focal.num_crops (and a fractional region_size)")
    return next(iter(counts)) if counts else focal.max_views(1024, 1024)


# ----------------------------------------------------------------------------------------------- plans
@dataclass
class CachePlan:
    """One mode's cache for a table: its folder, full size, bytes already on disk and rows already done."""

    mode: str
    spec: CacheSpec | None
    folder: Path | None
    nbytes: int
    on_disk: int
    done: int

    def budget(self, budget: str | float | int | None, free: int) -> int:
        """The budget this cache is held to: ``train.cache_budget`` (a size, or ``'N%'`` of the free space plus
        what the cache already occupies); default 80 % of the free space plus that."""
        if budget is None:
            return self.on_disk + int(DEFAULT_BUDGET_SHARE * free)
        text = str(budget).strip()
        if text.endswith("%"):
            return self.on_disk + int(float(text[:-1]) / 100 * free)
        return parse_size(budget)

    def fits(self, budget: str | float | int | None, free: int) -> bool:
        return self.nbytes <= self.budget(budget, free) and self.nbytes - self.on_disk <= free


def cache_plans(spec: CacheSpec, table: ImageTable, root: Path, rows: np.ndarray,
                images: list | None = None) -> list[CachePlan]:
    """Every mode the method can use for this table, fastest first, with sizes and progress (``images``: the
    table's :func:`image_keys`, when the caller has them)."""
    images = image_keys(table.meta["path"]) if images is None else images
    plans = []
    for mode, s in cache_modes(spec).items():
        if s is None:
            plans.append(CachePlan(mode, None, None, 0, 0, len(rows)))
            continue
        folder = cache_folder(root, {**s.parts, "images": images}, len(table), s.shapes)
        on_disk = on_disk_bytes(folder) if folder.is_dir() else 0
        done = int(done_mask(folder, len(table))[rows].sum()) if folder.is_dir() else 0
        plans.append(CachePlan(mode, s, folder, cache_bytes(len(table), s.shapes), on_disk, done))
    return plans


def choose_plan(plans: list[CachePlan], mode: str, budget, free: int) -> CachePlan:
    """``auto``: the fastest plan that fits the budget and the free space; a named mode: that plan, refused with
    the modes that would fit when it does not."""
    if isinstance(mode, bool):  # config files from before the modes: cache: true / false
        mode = "auto" if mode else "none"
    by_mode = {p.mode: p for p in plans}
    if mode not in CACHE_MODES:
        raise CacheError(f"train.cache: {mode!r} is not one of {', '.join(CACHE_MODES)}")
    if mode != "auto" and mode not in by_mode:
        raise CacheError(f"train.cache={mode}: this method cannot train from that; it can use "
                         f"{', '.join(by_mode)} (or auto)")
    if mode == "auto":
        return next(p for p in plans if p.fits(budget, free))  # 'none' always fits
    plan = by_mode[mode]
    if plan.fits(budget, free):
        return plan
    fitting = [p for p in plans if p.fits(budget, free)]
    raise CacheSpaceError(
        f"train.cache={mode}: the cache needs {format_size(plan.nbytes)} ({format_size(plan.on_disk)} already on "
        f"disk) in {plan.folder.parent} but the budget is {format_size(plan.budget(budget, free))} and "
        f"{format_size(free)} is free; modes that fit: "
        + ", ".join(f"{p.mode} ({format_size(p.nbytes)})" for p in fitting)
        + " — set train.cache to one of them, or raise train.cache_budget / free space",
        plan.folder, plan.nbytes - plan.on_disk, free)


def describe_plans(plans: list[CachePlan], chosen: CachePlan, requested: str, budget, free: int,
                   n_images: int) -> str:
    """The line printed before a build: mode, size, where, free space and budget (and the other modes)."""
    if chosen.spec is None:
        head = f"frozen-activation cache: mode none ({MODE_NOTES['none']})"
    else:
        head = (f"frozen-activation cache: mode {chosen.mode}, {format_size(chosen.nbytes)} for {n_images} images "
                f"({format_size(chosen.nbytes / max(n_images, 1))} each; {format_size(chosen.on_disk)} already "
                f"on disk) in {chosen.folder}; free {format_size(free)}, budget "
                f"{format_size(chosen.budget(budget, free))}")
    others = ", ".join(f"{p.mode} {format_size(p.nbytes)}" for p in plans if p is not chosen)
    why = "auto: the fastest mode that fits" if requested in ("auto", True) else "as set in train.cache"
    return f"{head} ({why}; other modes: {others or 'none'})"


# ----------------------------------------------------------------------------------------------- building
def _fill(cache: FeatureCache, spec: CacheSpec, table: ImageTable, todo: np.ndarray, *, batch_size: int,
          workers: int, device: str, amp: bool, skip_unreadable: bool, progress: bool) -> int:
    """Compute, write and mark ``todo`` rows; returns the number of unreadable images skipped."""
    ds = ViewDataset(table, spec.focal, spec.preprocess, train=False, skip_unreadable=skip_unreadable)
    loader = DataLoader(Subset(ds, np.asarray(todo).tolist()), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_views, persistent_workers=False, pin_memory=device.startswith("cuda"))
    use_amp = amp and device.startswith("cuda")
    skipped = 0
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc=f"caching frozen activations ({cache.bytes / 2**30:.1f} GiB)", unit="img",
               disable=not progress, dynamic_ncols=True)
    for batch in loader:
        skipped += batch["skipped"]
        if len(batch["index"]):
            values = _compute(spec, table, batch, device, use_amp)
            idx = batch["index"].numpy()
            cache.write(idx, values)
            cache.mark_done(idx)
        bar.update(len(batch["index"]) + batch["skipped"])
    bar.close()
    return skipped


def _compute(spec: CacheSpec, table: ImageTable, batch: dict, device: str, use_amp: bool) -> dict[str, Tensor]:
    n = batch["pixels"][0].shape[1]
    expected = spec.shapes[next(iter(spec.shapes))][0]
    if n != expected:
        bad = table.meta["path"].iloc[int(batch["index"][0])]
        raise DatasetError(f"{bad}: {n} focal views, the cache was sized for {expected}; set "
                           "focal.num_crops so every image gives the same number of views")
    pixels = [p.to(device, non_blocking=True) for p in batch["pixels"]]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
        return spec.compute(pixels)


class ComputedFeatures:
    """Mode ``none``: the cache's interface without storage; every read decodes the images and runs the frozen
    path (fp16 like a stored cache, so the modes give the same numbers)."""

    mode = "none"
    dir = None
    key = None
    bytes = 0

    def __init__(self, spec: CacheSpec, table: ImageTable, *, batch_size: int = 16, device: str = "cpu",
                 amp: bool = True, readable: np.ndarray | None = None) -> None:
        self.spec, self.table, self.batch_size, self.device = spec, table, batch_size, device
        self.use_amp = amp and device.startswith("cuda")
        self.n_rows, self.shapes = len(table), dict(spec.shapes)
        self.arrays = dict.fromkeys(spec.shapes)  # names only (callers check which tensors exist)
        self._readable = np.ones(len(table), dtype=bool) if readable is None else readable
        self._dataset = ViewDataset(table, spec.focal, spec.preprocess, train=False)

    def done(self) -> np.ndarray:
        return self._readable.copy()

    def read(self, rows: np.ndarray, names: list[str] | None = None) -> dict[str, Tensor]:
        rows = np.asarray(rows)
        parts: dict[str, list[Tensor]] = {n: [] for n in self.spec.shapes if names is None or n in names}
        for i in range(0, len(rows), self.batch_size):
            batch = collate_views([self._dataset[int(r)] for r in rows[i:i + self.batch_size]])
            values = _compute(self.spec, self.table, batch, self.device, self.use_amp)
            for n in parts:
                parts[n].append(values[n].detach().to("cpu", torch.float16))
        return {n: torch.cat(v) if v else torch.zeros((0, *self.spec.shapes[n]), dtype=torch.float16)
                for n, v in parts.items()}


def _readable_rows(table: ImageTable, rows: np.ndarray) -> np.ndarray:
    """Mode none with ``skip_unreadable``: decode each image once to know which rows can be read."""
    from ..data.images import ImageReadError, read_image

    mask = np.zeros(len(table), dtype=bool)
    paths = table.meta["path"].to_numpy()  # once: ``table.paths`` builds every row's Path
    for r in rows:
        try:
            read_image(paths[r])
            mask[r] = True
        except ImageReadError as exc:
            log.warning("skipping unreadable image (row %d): %s", r, exc)
    return mask


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_cache(spec: CacheSpec, table: ImageTable, rows: np.ndarray | None = None, *, root: str | Path | None = None,
                batch_size: int = 16, workers: int = 2, device: str = "cpu", amp: bool = True,
                skip_unreadable: bool = False, progress: bool = True, mode: str | bool = "auto",
                budget: str | float | int | None = None) -> FeatureCache | ComputedFeatures:
    """Compute the cache rows of ``rows`` (default all) that are not done yet; returns the cache.

    ``mode`` (``train.cache``): ``auto`` picks the fastest of :func:`cache_modes` that fits ``budget``
    (``train.cache_budget``) and the free space; a named mode that does not fit is refused with the modes that
    would. The size, the free space and the budget are printed before anything is built."""
    rank, size = world()
    root = Path(root) if root else default_cache_root()
    rows = np.arange(len(table)) if rows is None else np.asarray(rows)
    free = free_bytes(root)
    images = image_keys(table.meta["path"])  # one stat per image, shared by the plans and the cache's key
    plans = cache_plans(spec, table, root, rows, images)
    plan = choose_plan(plans, mode, budget, free)
    message = describe_plans(plans, plan, mode, budget, free, len(table))
    if plan.spec is None:
        if rank == 0:
            _say(message)
        readable = _readable_rows(table, rows) if skip_unreadable else None
        return ComputedFeatures(spec, table, batch_size=batch_size, device=device, amp=amp, readable=readable)
    if rank == 0:
        if plan.done < len(rows):
            _say(message)
        else:
            log.info(message.replace("frozen-activation cache:", "reusing the complete frozen-activation cache:"))
    spec = plan.spec
    parts = {**spec.parts, "images": images}
    fill = dict(batch_size=batch_size, device=device, amp=amp, skip_unreadable=skip_unreadable)
    with build_lock(plan.folder, enabled=rank == 0):  # a second run on the same cache waits, then reuses
        if rank == 0:  # create (and check) the files before the other ranks open them
            cache = FeatureCache(root, parts, len(table), spec.shapes)
        barrier()
        if rank != 0:
            cache = FeatureCache(root, parts, len(table), spec.shapes, rank=rank)
        todo = np.setdiff1d(rows, np.flatnonzero(cache.done()))[rank::size]
        if len(todo):
            skipped = _fill(cache, spec, table, todo, workers=workers, progress=progress and rank == 0, **fill)
            if skipped:
                log.warning("%d unreadable image(s) skipped while caching (see warnings above for the files)",
                            skipped)
        barrier()

    def repair(bad: np.ndarray) -> None:
        with build_lock(cache.dir):
            _fill(cache, spec, table, bad, workers=0, progress=False, **fill)
        still = bad[~cache.done()[bad]]
        if len(still):
            raise CacheError(f"cache {cache.dir}: could not rebuild {len(still)} damaged row(s) (first: image "
                             f"{table.meta['path'].iloc[int(still[0])]})")

    cache.repair = repair
    return cache


def cache_root_from(path: str | None) -> Path:
    """``train.cache_dir``, else ``$MEDBRIDGE_CACHE/features`` (``MEDBRIDGE_FEATURE_CACHE``: a deprecated alias, still
    honoured so that older scripts keep their caches)."""
    return Path(path) if path else Path(os.environ.get("MEDBRIDGE_FEATURE_CACHE") or default_cache_root())
