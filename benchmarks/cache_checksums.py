"""Cost of the frozen-activation cache's per-row checksums on a real-backbone-sized read (CPU).

    python benchmarks/cache_checksums.py [--rows 64] [--batch 16] [--dir /tmp]

The cache is shaped like the bundled DINOv2-S in isolated attention, T1 = 6 of 12 blocks, 5 views (whole image +
4 regions): ``e0.states`` [5, 6, 257, 384] + ``e0.frozen`` [5, 384] fp16 per image, 5.9 MB. It reads every row in
shuffled batches (as a training epoch does) three ways, each in a fresh ``FeatureCache`` (a new process's view):
  - without verification (the checks switched off: what the cache did before checksums),
  - with verification (rows checked against their CRC-32 the first time this process reads them),
  - a second epoch (rows already verified: no checks),
once with the files in the page cache (warm: the worst case for the ratio, reads at memory speed) and once with
them evicted first (cold: ``posix_fadvise(DONTNEED)``, reads from disk). Prints MB/s and the ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medbridge.engine.cache import FeatureCache, format_size, free_bytes

SHAPES = {"e0.states": (5, 6, 257, 384), "e0.frozen": (5, 384)}


def evict(cache: FeatureCache) -> None:
    for f in cache.dir.glob("*.f16"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def epoch(cache: FeatureCache, n: int, batch: int, seed: int) -> float:
    order = np.random.default_rng(seed).permutation(n)
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        cache.read(order[i:i + batch])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="medbridge-crc-bench-", dir=a.dir))
    parts = {"bench": "checksums"}
    need = a.rows * sum(2 * int(np.prod(s)) + 4 for s in SHAPES.values())
    if need > 0.5 * free_bytes(root):
        raise SystemExit(f"{format_size(need)} needed in {root}, only {format_size(free_bytes(root))} free")
    try:
        cache = FeatureCache(root, parts, a.rows, SHAPES)
        gen = torch.Generator().manual_seed(0)
        for i in range(0, a.rows, a.batch):
            rows = np.arange(i, min(i + a.batch, a.rows))
            cache.write(rows, {k: torch.randn(len(rows), *s, generator=gen).half() for k, s in SHAPES.items()})
            cache.mark_done(rows)
        mb = cache.bytes / 1e6
        print(f"{a.rows} rows x {format_size(cache.bytes / a.rows)} (DINOv2-S isolated, T1=6, 5 views) = "
              f"{format_size(cache.bytes)}; batches of {a.batch}; torch threads {torch.get_num_threads()}")
        for state in ("warm", "cold"):
            times = {}
            for how in ("unverified", "verified"):
                c = FeatureCache(root, parts, a.rows, SHAPES)
                if how == "unverified":
                    for v in c._verified.values():
                        v[:] = True
                if state == "cold":
                    evict(c)
                else:
                    epoch(c, a.rows, a.batch, 99)  # pages in memory; does not mark rows verified for the
                    for v in c._verified.values():  # timed epoch below
                        v[:] = how == "unverified"
                times[how] = epoch(c, a.rows, a.batch, 1)
                if how == "verified":
                    if state == "cold":
                        evict(c)
                    times["second epoch"] = epoch(c, a.rows, a.batch, 2)
            print(f"[{state}] read without checks {mb / times['unverified']:7.0f} MB/s | with checks (first read) "
                  f"{mb / times['verified']:7.0f} MB/s | second epoch {mb / times['second epoch']:7.0f} MB/s | "
                  f"overhead first read {times['verified'] / times['unverified']:.2f}x, later epochs "
                  f"{times['second epoch'] / times['unverified']:.2f}x")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
