"""Frozen-activation cache: what no trainable parameter touches is computed once per (image, view) and reused.

One folder per key (backbones' fingerprints, what is cached, view config, preprocessing and the images' paths,
sizes and modification times); inside, one fp16 memory-mapped file per tensor with a row per image, and
``done.npy`` marking rows that are complete. Rows are marked done only after their data is flushed, so an
interrupted build resumes where it stopped; any change of a key part gives a new folder (old ones are not
reused). Distributed builds: each rank fills its own rows and marks them in ``done.rank<r>.npy``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..backbones.loading import atomic_write_bytes

CACHE_FORMAT = "medbridge-cache/1"


def image_keys(paths: list[Path]) -> list[list]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


class FeatureCache:
    """fp16 arrays ``name -> [n_rows, *shape]`` stored as memory maps under ``root/<key>/``."""

    def __init__(self, root: str | Path, parts: dict, n_rows: int, shapes: dict[str, tuple[int, ...]],
                 rank: int = 0) -> None:
        self.key = cache_key({**parts, "shapes": shapes, "rows": n_rows, "format": CACHE_FORMAT})
        self.dir = Path(root) / self.key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.n_rows, self.shapes, self.rank = n_rows, dict(shapes), rank
        meta = self.dir / "meta.json"
        if not meta.is_file() and rank == 0:
            atomic_write_bytes(meta, json.dumps({"format": CACHE_FORMAT, "rows": n_rows, "shapes": shapes,
                                                 "parts": parts}, default=str, indent=1).encode())
        self.arrays = {}
        for name, shape in self.shapes.items():
            f = self.dir / f"{name}.f16"
            mode = "r+" if f.is_file() and f.stat().st_size == 2 * n_rows * int(np.prod(shape)) else "w+"
            if mode == "w+" and rank != 0:
                mode = "r+"  # rank 0 creates; others wait on a barrier before opening (see build_cache)
            self.arrays[name] = np.memmap(f, dtype=np.float16, mode=mode, shape=(n_rows, *shape))
        self._done_file = self.dir / ("done.npy" if rank == 0 else f"done.rank{rank}.npy")
        self._mine: np.ndarray | None = None

    @property
    def bytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def done(self) -> np.ndarray:
        mask = np.zeros(self.n_rows, dtype=bool)
        for f in self.dir.glob("done*.npy"):
            try:
                part = np.load(f)
            except (OSError, ValueError):
                continue  # a half-written flag file: its rows are recomputed
            if part.shape == mask.shape:
                mask |= part
        return mask

    def write(self, rows: np.ndarray, values: dict[str, torch.Tensor]) -> None:
        for name, t in values.items():
            self.arrays[name][rows] = t.detach().to("cpu", torch.float16).numpy()

    def mark_done(self, rows: np.ndarray) -> None:
        for a in self.arrays.values():
            a.flush()
        if self._mine is None:  # this process's flags, read once and kept
            self._mine = np.load(self._done_file) if self._done_file.is_file() else np.zeros(self.n_rows, dtype=bool)
        self._mine[rows] = True
        buf = io.BytesIO()
        np.save(buf, self._mine)
        atomic_write_bytes(self._done_file, buf.getvalue())

    def read(self, rows: np.ndarray, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        rows = np.asarray(rows)
        order = np.argsort(rows)
        inv = np.empty_like(order)
        inv[order] = np.arange(len(rows))
        return {name: torch.from_numpy(np.ascontiguousarray(a[rows[order]][inv])) for name, a in self.arrays.items()
                if names is None or name in names}
