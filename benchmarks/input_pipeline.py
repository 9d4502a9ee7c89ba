"""Input pipeline on CPU: images/s of decode + focal views, full decode vs the JPEG decoder's reduced-size decode.

    python benchmarks/input_pipeline.py [--data ../shared/data/nih-cxr14-sample] [--images 24] [--keep]

Two image sets: the real NIH sample (1024 x 1024 JPEG) and MIMIC-sized JPEGs made from it (upscaled bicubic to
2544 x 3056, film grain added until a file has MIMIC-CXR-JPG's mean byte size, ~1.5 MB, saved at quality 95 under
/tmp; byte sizes printed). Two view configs at the bundled DINOv2-S input (224 px): the whole image only
(``num_crops=0``: the probe, the baselines, MedBridge without regions) and whole + 4 regions (``region_size=0.5,
stride=1.0``). Per image, one process, one decode for all views:
  - before: full-resolution decode (``read_image``) + ``focal_views``;
  - after: ``read_view_image`` (Pillow's ``Image.draft``: the JPEG decoder's DCT-scaled decode at the coarsest
    1/2, 1/4, 1/8 scale at which every view keeps >= 2 x 224 px per side) + ``focal_views`` on it.
Before and after alternate image by image and the medians are reported (robust to other load on the machine). The
views from the reduced decode are compared with full decode + resize: pixel differences (in [0, 1] units) and the
cosine similarity of their DINOv2-S embeddings.
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medbridge import create_backbone
from medbridge.data.focal import FocalConfig, focal_views, read_view_image
from medbridge.data.images import read_image

MIMIC_SIZE = (2544, 3056)  # width x height


def _upscaled(src: Path, noise: float) -> Image.Image:
    with Image.open(src) as im:
        big = np.asarray(im.convert("L").resize(MIMIC_SIZE, Image.BICUBIC), dtype=np.float32)
    grain = np.random.default_rng(0).standard_normal(big.shape).astype(np.float32) * noise
    return Image.fromarray(np.clip(big + grain, 0, 255).round().astype(np.uint8))


def _jpeg_bytes(image: Image.Image, quality: int) -> int:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.tell()


def make_mimic_sized(sources: list[Path], folder: Path, quality: int,
                     target_mb: float) -> tuple[list[Path], float]:
    """Upscaled copies with film-grain noise (sigma in grey levels, bisected on the first image) so that their
    JPEG byte size matches ``target_mb``: an upscaled image alone compresses far better than a real one."""
    folder.mkdir(parents=True, exist_ok=True)
    lo, hi = 0.0, 16.0
    for _ in range(7):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _jpeg_bytes(_upscaled(sources[0], mid), quality) < target_mb * 1e6 else (lo, mid)
    noise = (lo + hi) / 2
    out = []
    for src in sources:
        dst = folder / f"{src.stem}_mimic_q{quality}_n{noise:.2f}.jpg"
        if not dst.is_file():
            _upscaled(src, noise).save(dst, quality=quality)
        out.append(dst)
    return out, noise


def time_pipeline(paths: list[Path], focal: FocalConfig, pre) -> dict[str, float]:
    """Median seconds per image of each pipeline, alternating before/after on each image."""
    times = {"before": [], "after": [], "decode full": [], "decode reduced": []}
    for p in paths:
        t0 = time.perf_counter()
        focal_views(read_image(p), focal, pre)
        times["before"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        image, full = read_view_image(p, focal, pre)
        focal_views(image, focal, pre, full_size=full)
        times["after"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        read_image(p)
        times["decode full"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        read_view_image(p, focal, pre)
        times["decode reduced"].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def view_agreement(paths: list[Path], focal: FocalConfig, pre, vision) -> tuple[float, float, float] | None:
    """(max |pixel difference|, mean |pixel difference|, min embedding cosine) of every view, reduced vs full
    decode; None when no reduced decode applies."""
    std = torch.tensor(pre.std).view(3, 1, 1)
    full_views, reduced_views = [], []
    for p in paths:
        image, size = read_view_image(p, focal, pre)
        if size is None:
            return None
        full = focal_views(read_image(p), focal, pre)
        reduced = focal_views(image, focal, pre, full_size=size)
        assert torch.equal(full.boxes, reduced.boxes), p
        full_views.append(full.pixels)
        reduced_views.append(reduced.pixels)
    a, b = torch.cat(full_views), torch.cat(reduced_views)
    diff = ((a - b) * std).abs()  # back in [0, 1] pixel units
    with torch.no_grad():
        ea = vision.finalize(vision.run_blocks(vision.embed(a), 0))
        eb = vision.finalize(vision.run_blocks(vision.embed(b), 0))
    cos = torch.nn.functional.cosine_similarity(ea, eb, dim=-1)
    return float(diff.max()), float(diff.mean()), float(cos.min())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/nih-cxr14-sample")
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--quality", type=int, default=95)
    ap.add_argument("--target-mb", type=float, default=1.5,
                    help="JPEG bytes per MIMIC-sized image (MIMIC-CXR-JPG 2.0: ~570 GB / 377,110 files)")
    ap.add_argument("--keep", action="store_true", help="keep the MIMIC-sized JPEGs in /tmp")
    a = ap.parse_args()
    torch.set_num_threads(1)  # one core per decoding worker, as in a DataLoader worker
    nih = sorted((Path(a.data) / "images").glob("*.jpg"))[: a.images]
    tmp = Path(tempfile.gettempdir()) / "medbridge-mimic-sized"
    mimic, noise = make_mimic_sized(nih, tmp, a.quality, a.target_mb)
    vision = create_backbone("dinov2-small").vision
    pre = vision.preprocess
    sizes = {name: np.mean([p.stat().st_size for p in paths]) / 1e6 for name, paths in (("nih", nih),
                                                                                          ("mimic", mimic))}
    print(f"{a.images} images per set; NIH sample 1024 x 1024 JPEG ({sizes['nih']:.2f} MB each), MIMIC-sized "
          f"{MIMIC_SIZE[0]} x {MIMIC_SIZE[1]} JPEG q{a.quality} with grain sigma {noise:.1f} ({sizes['mimic']:.2f} MB "
          f"each); input "
          f"{pre.image_size} px; one process, torch threads 1; medians per image")
    configs = {"whole only (1 view)": FocalConfig(num_crops=0),
               "whole + 4 regions (5 views)": FocalConfig(region_size=0.5, stride=1.0)}
    for set_name, paths in (("NIH 1024", nih), ("MIMIC-sized", mimic)):
        for cfg_name, focal in configs.items():
            t = time_pipeline(paths, focal, pre)
            print(f"[{set_name:11s} | {cfg_name:27s}] before {1 / t['before']:6.1f} img/s | after "
                  f"{1 / t['after']:6.1f} img/s | speed-up {t['before'] / t['after']:.2f}x | decode full "
                  f"{1e3 * t['decode full']:4.0f} ms, as read for the views {1e3 * t['decode reduced']:4.0f} ms")
            agree = view_agreement(paths, focal, pre, vision)
            print("    views, reduced vs full decode: " + ("no reduction applies (full decode)" if agree is None else
                  f"max |diff| {agree[0]:.4f}, mean |diff| {agree[1]:.5f} (pixels in [0, 1]); DINOv2-S "
                  f"embedding cosine >= {agree[2]:.5f}"))
    if not a.keep:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
