"""``medbridge predict`` throughput against its floor, side by side in one run, on real NIH JPEGs.

    PYTHONPATH=src python benchmarks/predict_throughput.py [--data ../shared/data/nih-cxr14-sample] [--images 96]
        [--batch 16] [--workers N] [--device cpu] [--method medbridge] [--repeats 2]

predict: :func:`medbridge.engine.evaluate.predict_images` (what the CLI runs) on the JPEG files: decode + focal
views in DataLoader workers, the method's scores, per-image rows. Floor: the frozen backbone's forward (all
blocks) of the same views, already decoded and in memory, in batches of the same size. Also shown: the method's
own scoring of the in-memory views (the floor plus the adapter). The method is the demo preset's (bundled
DINOv2-S + MiniLM, whole image only) with untrained adapter weights: speed does not depend on the values. Passes
alternate (floor, predict, ...) and the best of ``--repeats`` counts; goal: predict >= 0.8 of the floor.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from medbridge.data.focal import focal_views, read_view_image
from medbridge.engine.evaluate import predict_images
from medbridge.methods import create_method, load_method, save_method
from medbridge.methods.inference import resolve_workers, score_views

LABELS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
          "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/nih-cxr14-sample")
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=None, help="decode workers (default: from the machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--method", default="medbridge")
    ap.add_argument("--backbone", default="dinov2-small+minilm-l6")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    paths = sorted((Path(args.data) / "images").glob("*.jpg"))[:args.images]
    torch.manual_seed(0)
    built = create_method(args.method, backbones=[args.backbone], labels=LABELS,
                          focal={"region_size": 512, "stride": 512, "num_crops": 0})
    folder = save_method(built, Path(tempfile.mkdtemp()) / args.method)
    method = load_method(folder).to(args.device).eval()  # loaded as predict loads it
    decoded = []
    for p in paths:
        x, full = read_view_image(p, method.focal, method.preprocess)
        decoded.append(focal_views(x, method.focal, method.preprocess, full_size=full))
    batches = [[torch.stack([v[k].pixels for v in decoded[i:i + args.batch]]) for k in range(len(method.preprocess))]
               for i in range(0, len(decoded), args.batch)]
    towers = [b.vision for b in method.backbones]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def floor() -> None:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device.startswith("cuda")):
            for px in batches:
                for v, p in zip(towers, px):
                    v.finalize(v.run_blocks(v.embed(p.to(args.device).flatten(0, 1)), 0))
        sync()

    def model_only() -> None:
        for px in batches:
            score_views(method, px, args.device)
        sync()

    def predict() -> None:
        rows = predict_images(method, paths, batch_size=args.batch, device=args.device, workers=args.workers)
        assert len(rows) == len(paths) and all("probabilities" in r for r in rows)
        sync()

    floor()  # warm-up
    best = {"floor": float("inf"), "model": float("inf"), "predict": float("inf")}
    for _ in range(args.repeats):
        for name, fn in (("floor", floor), ("model", model_only), ("predict", predict)):
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    ips = {k: len(paths) / v for k, v in best.items()}
    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    print(f"{len(paths)} NIH JPEGs (1024 px), {decoded[0][0].pixels.shape[0]} view(s) each, batch {args.batch}, "
          f"{resolve_workers(args.workers)} decode worker(s), {args.method} on {args.backbone} ({dev})")
    print(f"floor (frozen forward of the decoded views): {ips['floor']:7.2f} images/s")
    print(f"method scoring of the decoded views:         {ips['model']:7.2f} images/s")
    print(f"predict (JPEG files -> rows):                {ips['predict']:7.2f} images/s")
    print(f"ratio predict / floor: {ips['predict'] / ips['floor']:.2f}  (goal >= 0.8); "
          f"predict / method scoring: {ips['predict'] / ips['model']:.2f}")


if __name__ == "__main__":
    main()
