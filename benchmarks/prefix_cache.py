"""Frozen-activation cache vs no cache, side by side on the NIH sample with the bundled backbone (CPU).

    python benchmarks/prefix_cache.py [--data ../shared/data/nih-cxr14-sample] [--images 32] [--views 5]

Each phase runs in a fresh process (so its peak RSS is its own) on the same decoded views of the same images:
  - train epoch WITHOUT cache: every step runs the frozen backbone (blocks 1..T) and the query path;
  - train epoch WITH cache: joint attention reads the cached block-T1 prefix; isolated attention reads the
    cached frozen states of blocks T1+1..T and computes only the query rows;
  - inference images/s at 1, 5 and 10 views (no cache).
T1 = depth/2 = 6, Q = 8, batch 16, AdamW. Prints epoch times and the speed-up ratios.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time

import numpy as np


def _setup(data: str, n_images: int, views: int, attention: str):
    import torch

    from medbridge import create_backbone
    from medbridge.data import FocalConfig, ViewDataset, load_dataset
    from medbridge.methods.medbridge.model import MedBridgeConfig, MedBridgeModel

    torch.manual_seed(0)
    table = load_dataset("nih", data).subset(range(n_images))
    focal = {1: FocalConfig(num_crops=0), 5: FocalConfig(stride=512), 10: FocalConfig()}[views]
    backbone = create_backbone("dinov2-small+minilm-l6")
    cfg = MedBridgeConfig(labels=list(table.labels), attention=attention, focal=focal, num_queries=8)
    model = MedBridgeModel(cfg, [backbone])
    ds = ViewDataset(table, focal, model.preprocess)
    pixels = torch.stack([ds[i]["pixels"][0] for i in range(len(ds))])
    return model, pixels, torch.from_numpy(table.targets)


def _epoch(args, queue) -> None:
    data, n_images, views, attention, cached, batch = args
    import torch

    from medbridge.engine.cache import FeatureCache
    from medbridge.methods.medbridge.method import medbridge_cache_values, split_cached

    model, pixels, targets = _setup(data, n_images, views, attention)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    build = 0.0
    if cached:
        t0 = time.perf_counter()
        with torch.no_grad():
            chunks = [medbridge_cache_values(model, [pixels[i:i + batch]]) for i in range(0, n_images, batch)]
        values = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
        cache = FeatureCache(tempfile.mkdtemp(), {"bench": 1}, n_images, {k: tuple(v.shape[1:])
                                                                           for k, v in values.items()})
        cache.write(np.arange(n_images), values)
        cache.mark_done(np.arange(n_images))
        del values, chunks
        build = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(0, n_images, batch):
        rows = np.arange(i, min(i + batch, n_images))
        out = model.forward_cached(split_cached(cache.read(rows), 1, "cpu")) if cached else model([pixels[rows]])
        loss = model.loss(out, targets[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    epoch = time.perf_counter() - t0
    queue.put({"epoch_s": epoch, "build_s": build, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF)
               .ru_maxrss / 2**20, "cache_gib": cache.bytes / 2**30 if cached else 0.0})


def _inference(args, queue) -> None:
    data, n_images, views = args
    import torch

    model, pixels, _ = _setup(data, n_images, views, "isolated")
    model.eval()
    with torch.no_grad():
        model([pixels[:2]])
        t0 = time.perf_counter()
        for i in range(0, n_images, 16):
            model([pixels[i:i + 16]])
    queue.put({"images_s": n_images / (time.perf_counter() - t0),
               "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})


def run(target, args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(args, q))
    p.start()
    res = q.get()
    p.join()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/nih-cxr14-sample")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--views", type=int, default=5, choices=[1, 5, 10])
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    import torch

    print(f"NIH sample, {a.images} images x {a.views} views, bundled DINOv2-S (T1=6 of 12, Q=8), batch {a.batch}, "
          f"CPU threads {torch.get_num_threads()}")
    for attention in ("isolated", "joint"):
        plain = run(_epoch, (a.data, a.images, a.views, attention, False, a.batch))
        cached = run(_epoch, (a.data, a.images, a.views, attention, True, a.batch))
        print(f"[{attention}] epoch without cache {plain['epoch_s']:.1f} s (peak RSS {plain['peak_rss_gib']:.2f} "
              f"GiB) | with cache {cached['epoch_s']:.1f} s (peak RSS {cached['peak_rss_gib']:.2f} GiB, cache "
              f"{cached['cache_gib']:.2f} GiB, one-off build {cached['build_s']:.1f} s) | speed-up "
              f"{plain['epoch_s'] / cached['epoch_s']:.2f}x")
    for views in (1, 5, 10):
        r = run(_inference, (a.data, a.images, views))
        print(f"inference (isolated, no cache) at {views:2d} views: {r['images_s']:.2f} images/s "
              f"(peak RSS {r['peak_rss_gib']:.2f} GiB)")


if __name__ == "__main__":
    main()
