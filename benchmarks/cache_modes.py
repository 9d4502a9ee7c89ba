"""Cache modes side by side on CPU: size, build time and training-epoch time of MedBridge from each mode.

    python benchmarks/cache_modes.py [--data ../shared/data/nih-cxr14-sample] [--images 16] [--batch 8]

Bundled DINOv2-S + MiniLM, isolated attention, T1 = 6 of 12, Q = 8, 5 views (whole + 2 x 2 regions of half the
short side). Each mode (``train.cache``) is built with ``build_cache`` into a temporary folder, then two training
epochs of the shared training loop (``fit_method``) read it (the fastest epoch is reported: the loop alone, as in
the run's history):
  - full: block inputs T1+1..T + pooled output stored; each step computes only the query rows;
  - prefix: block-T1 tokens stored; each step reruns the frozen blocks T1+1..T, then the query rows;
  - none: nothing stored; each step decodes the images and runs the whole frozen path.
Prints bytes per image, build seconds and epoch seconds, with ratios to ``full``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/nih-cxr14-sample")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2, help="epochs per mode; the fastest is reported")
    a = ap.parse_args()
    from medbridge import create_backbone
    from medbridge.data import FocalConfig, load_dataset
    from medbridge.engine.config import TrainConfig
    from medbridge.engine.features import build_cache
    from medbridge.engine.trainer import fit_method
    from medbridge.methods import TrainingData
    from medbridge.methods.medbridge.method import MedBridgeMethod
    from medbridge.methods.medbridge.model import MedBridgeConfig, MedBridgeModel

    table = load_dataset("nih", a.data).subset(range(a.images))
    focal = FocalConfig(region_size=0.5, stride=1.0)
    torch.manual_seed(0)
    cfg = MedBridgeConfig(labels=list(table.labels), prompt_names=list(table.prompt_names), attention="isolated",
                          focal=focal, num_queries=8)
    backbone = create_backbone("dinov2-small+minilm-l6")
    start = {k: v.clone() for k, v in MedBridgeModel(cfg, [backbone]).state_dict().items()}
    root = Path(tempfile.mkdtemp(prefix="medbridge-modes-"))
    rows = np.arange(a.images)
    results = {}
    print(f"NIH sample, {a.images} images x 5 views, bundled DINOv2-S (T1=6 of 12, Q=8, isolated), batch "
          f"{a.batch}, CPU threads {torch.get_num_threads()}")
    try:
        for mode in ("full", "prefix", "none"):
            model = MedBridgeModel(cfg, [backbone])
            model.load_state_dict(start)
            method = MedBridgeMethod.from_model(model)
            t0 = time.perf_counter()
            cache = build_cache(method.cache_spec(5), table, root=root / mode, batch_size=a.batch, workers=0,
                                progress=False, mode=mode)
            build = time.perf_counter() - t0
            tc = TrainConfig(batch_size=a.batch, epochs=a.epochs, checkpoint_every=0, workers=0)
            history = fit_method(method, TrainingData(cache, table.targets, rows, rows[:0]), tc, root / f"run-{mode}",
                                 progress_bar=False)
            results[mode] = (cache.bytes / a.images, build, min(h["seconds"] for h in history))
        base = results["full"]
        for mode, (per_image, build, epoch) in results.items():
            print(f"{mode:6s}: {per_image / 1e6:6.2f} MB per image | build {build:6.1f} s | epoch {epoch:6.1f} s "
                  f"({epoch / base[2]:.2f}x the full cache's epoch)")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
