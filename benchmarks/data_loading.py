"""Data loading vs backbone speed on the NIH sample (decode 1024-px JPEG + focal views), side by side.

    python benchmarks/data_loading.py [--data ../shared/data/nih-cxr14-sample] [--images 96] [--workers 2]

Prints images/s of (a) a DataLoader with ``--workers`` workers producing the focal views (whole image + 3x3 grid
of 512-px regions -> 10 views at 224 px) and (b) the bundled DINOv2-S forward on those views, and their ratio.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

from medbridge import create_backbone
from medbridge.data import FocalConfig, ViewDataset, collate_views, load_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/nih-cxr14-sample")
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    table = load_dataset("nih", args.data).subset(range(args.images))
    backbone = create_backbone("dinov2-small")
    focal = FocalConfig()
    ds = ViewDataset(table, focal, [backbone.vision.preprocess])
    loader = DataLoader(ds, batch_size=args.batch, num_workers=args.workers, collate_fn=collate_views)
    t0 = time.perf_counter()
    batches = list(loader)
    t_load = time.perf_counter() - t0
    n_views = batches[0]["pixels"][0].shape[1]
    v = backbone.vision
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with torch.no_grad():
        v.finalize(v.run_blocks(v.embed(batches[0]["pixels"][0][:1].flatten(0, 1)), 0))  # warm-up
        t0 = time.perf_counter()
        for b in batches:
            v.finalize(v.run_blocks(v.embed(b["pixels"][0].flatten(0, 1)), 0))
        t_fwd = time.perf_counter() - t0
    load_ips, fwd_ips = args.images / t_load, args.images / t_fwd
    print(f"images: {args.images} (NIH sample, 1024 px JPEG), views per image: {n_views}, "
          f"torch threads: {torch.get_num_threads()}")
    print(f"data loading ({args.workers} workers): {load_ips:7.2f} images/s  ({load_ips * n_views:.1f} views/s)")
    print(f"backbone forward (DINOv2-S, all {v.depth} blocks): {fwd_ips:7.2f} images/s  "
          f"({fwd_ips * n_views:.1f} views/s)")
    print(f"ratio loading / backbone: {load_ips / fwd_ips:.2f}x  (goal >= 3x)")


if __name__ == "__main__":
    main()
