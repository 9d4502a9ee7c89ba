"""Batched inference on a device, for every method: images decoded into focal views in DataLoader workers,
batches pinned and moved to the device, bf16 autocast on CUDA (as in training), a progress bar. Used by
``predict``, ``serve``, ``eval`` and :meth:`Method.predict`; it talks to a method through ``scores_views`` only
(the engine imports it, never the other way round).

On CUDA, bf16 autocast changes probabilities by up to ``BF16_TOLERANCE`` (absolute) against the CPU's fp32;
without autocast (``amp=False``) a GPU agrees with the CPU within ``FP32_TOLERANCE``."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..backbones.base import PreprocessConfig
from ..data.focal import FocalConfig, focal_views, read_view_image, view_bounds_problem
from ..data.images import ImageReadError
from ..io import check_finite

log = logging.getLogger(__name__)

#: largest |GPU - CPU| probability difference accepted (benchmarks/gpu_check.py checks both on a GPU)
FP32_TOLERANCE = 1e-3
BF16_TOLERANCE = 3e-2


def resolve_device(name: str, what: str = "device") -> str:
    """``auto`` -> CUDA when present, else cpu; a CUDA device without a visible GPU is refused naming ``what``."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{what}={name!r} but no CUDA GPU is visible; use cpu or auto")
    return name


def default_workers() -> int:
    """DataLoader decode workers from the machine: one core left to the main process, at most 8 (0 on 1 core)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(cores - 1, 8))


def resolve_workers(workers: int | None) -> int:
    """``None`` -> :func:`default_workers`; a negative count is refused."""
    if workers is None:
        return default_workers()
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    return int(workers)


class ImageViews(Dataset):
    """Image files (or arrays in [0, 1], H x W) -> focal views; an unreadable file gives an error item when
    ``skip_unreadable`` (else its error is raised, naming the file)."""

    def __init__(self, images: Sequence, focal: FocalConfig, preprocess: list[PreprocessConfig],
                 skip_unreadable: bool = False) -> None:
        self.images, self.focal, self.preprocess = images, focal, list(preprocess)
        self.skip_unreadable = skip_unreadable

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        x = self.images[i]
        try:
            image, full = (x, None) if isinstance(x, np.ndarray) else read_view_image(x, self.focal, self.preprocess)
            width, height = full or (image.shape[1], image.shape[0])
            problem = view_bounds_problem(height, width, self.focal)  # serve's bounds on the work per image
            if problem:
                raise ImageReadError(f"{_name(x)}: {problem}")
        except Exception as exc:
            if not self.skip_unreadable:
                raise
            return {"index": i, "error": str(exc)}
        views = focal_views(image, self.focal, self.preprocess, full_size=full)
        return {"index": i, "pixels": [v.pixels for v in views], "boxes": views[0].boxes}


def collate_groups(items: list[dict]) -> dict:
    """A batch as groups of images with the same number of views (each stacked per expert) plus error items."""
    ok = [x for x in items if "error" not in x]
    groups = []
    for n in sorted({x["pixels"][0].shape[0] for x in ok}):
        g = [x for x in ok if x["pixels"][0].shape[0] == n]
        groups.append({"index": [x["index"] for x in g], "boxes": [x["boxes"] for x in g],
                       "pixels": [torch.stack([x["pixels"][k] for x in g]) for k in range(len(g[0]["pixels"]))]})
    return {"groups": groups, "errors": [(x["index"], x["error"]) for x in items if "error" in x]}


def score_views(method, pixels: list[Tensor], device: str, amp: bool = True) -> tuple[np.ndarray, dict]:
    """``method.scores_views`` on ``device`` (the method must already be there), bf16 autocast on CUDA when
    ``amp``; scores and details come back as float32 numpy."""
    pixels = [p.to(device, non_blocking=True) for p in pixels]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.startswith("cuda")):
        scores, details = method.scores_views(pixels)
    return np.asarray(scores, dtype=np.float32), details


@dataclass
class Scored:
    """One image's result: its index in the input, scores [L] (None if unreadable), the method's details for it
    (MedBridge: gate, per-view votes), its views' boxes, or the error of an unreadable file."""

    index: int
    scores: np.ndarray | None = None
    details: dict | None = None
    boxes: Tensor | None = None
    error: str | None = None


def iter_scored(method, images: Sequence, *, batch_size: int = 16, device: str = "cpu", workers: int | None = None,
                amp: bool = True, skip_unreadable: bool = False, progress: bool = False,
                desc: str = "predicting") -> Iterator[Scored]:
    """Score image files/arrays in batches on ``device`` (decoding in ``workers`` processes); yields one
    :class:`Scored` per image, in input order within each batch."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    # one batch: decoding in the main process is as fast (no worker to start)
    workers = max(0, min(resolve_workers(workers), -(-len(images) // batch_size) - 1))
    method.to(device)
    method.eval()
    loader = DataLoader(ImageViews(images, method.focal, method.preprocess, skip_unreadable), batch_size=batch_size,
                        num_workers=workers, collate_fn=collate_groups, pin_memory=device.startswith("cuda"),
                        prefetch_factor=4 if workers else None)
    from tqdm import tqdm

    bar = tqdm(total=len(images), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    for batch in loader:
        out: list[Scored] = [Scored(i, error=e) for i, e in batch["errors"]]
        for e in out:
            log.warning("skipping unreadable image %s: %s", _name(images[e.index]), e.error)
        for g in batch["groups"]:
            scores, details = score_views(method, g["pixels"], device, amp)
            check_finite(scores, f"{method.name} scores of {', '.join(_name(images[i]) for i in g['index'][:3])}")
            for gi, i in enumerate(g["index"]):
                out.append(Scored(i, scores[gi], {k: v[gi] for k, v in details.items()}, g["boxes"][gi]))
        out.sort(key=lambda s: s.index)
        bar.update(len(out))
        yield from out
    bar.close()


def _name(x) -> str:
    return str(x) if isinstance(x, (str, Path)) else "an array image"


__all__ = ["BF16_TOLERANCE", "FP32_TOLERANCE", "ImageViews", "Scored", "default_workers", "iter_scored",
           "resolve_device", "resolve_workers", "score_views"]
