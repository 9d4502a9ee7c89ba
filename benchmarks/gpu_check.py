"""GPU check and timings of the engine's hot paths (run on a CUDA machine; random weights, no downloads).

    python benchmarks/gpu_check.py [--data /tmp/b/nih-cxr14-sample] [--json $OUT/gpu_rates.json]
    python benchmarks/gpu_check.py --smoke     # CPU, tiny towers, a few images: every path runs (minutes)

1. Exactness on GPU: tiny MedBridge model, cached vs direct forward on CUDA (fp32) and vs CPU; bf16 autocast
   close to fp32.
2. Training on CUDA with bf16 autocast through the shared loop ``fit_method`` (loss finite, adapter changes,
   backbone not).
3. Timings on a ViT-B/16-sized model (timm vit_base_patch16_224, random init, 224 px, 5 views, T1 = 6, Q = 8):
   cache building views/s, training images/s without cache vs from the isolated-mode cache (same batch), and the
   same for the bundled DINOv2-S (when its converted weights are in the cache).
4. End-to-end rates on the real NIH JPEGs: decode + focal views in CPU DataLoader workers, nvJPEG through
   torchvision (when it has it), ``predict_images`` on the GPU, GPU vs CPU predictions (fp32 within
   ``FP32_TOLERANCE``, bf16 within ``BF16_TOLERANCE``), peak GPU memory, and the paper setting's projected wall
   time from those rates (MIMIC-CXR-JPG: ``PAPER_IMAGES`` images, 5 views, 3 epochs).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def tiny_model(attention="isolated"):
    from medbridge.backbones.registry import tiny_builders
    from medbridge.methods.medbridge.model import MedBridgeConfig, MedBridgeModel

    torch.manual_seed(0)
    b = tiny_builders()
    cfg = MedBridgeConfig(labels=["a", "b", "c"], backbones=["tiny"], num_queries=4, attention=attention, t1=2)
    return MedBridgeModel(cfg, [b["tiny-hf-dinov2"]()], text=b["tiny-hf-clip"]().text)


def exactness() -> None:
    for attention in ("isolated", "joint"):
        model = tiny_model(attention)
        px = torch.randn(4, 3, 3, 32, 32)
        with torch.no_grad():
            cpu = model([px]).logits
            model.cuda()
            gpu = model([px.cuda()]).logits
            cached = model.forward_cached(model.cacheable([px.cuda()])).logits
            with torch.autocast("cuda", dtype=torch.bfloat16):
                bf16 = model.forward_cached(model.cacheable([px.cuda()])).logits.float()
        print(f"[{attention}] max |gpu - cpu| {float((gpu.cpu() - cpu).abs().max()):.2e}  "
              f"|cached - direct| {float((cached - gpu).abs().max()):.2e}  |bf16 - fp32| "
              f"{float((bf16 - gpu).abs().max()):.2e}")
        assert torch.allclose(gpu.cpu(), cpu, atol=1e-3, rtol=1e-3) and torch.allclose(cached, gpu, atol=1e-4)


def training() -> None:
    from medbridge.engine.cache import FeatureCache
    from medbridge.engine.config import TrainConfig
    from medbridge.engine.trainer import fit_method
    from medbridge.methods import TrainingData
    from medbridge.methods.medbridge.method import MedBridgeMethod, medbridge_cache_values

    model = tiny_model().cuda()
    px = torch.randn(32, 3, 3, 32, 32, device="cuda")
    with torch.no_grad():
        values = medbridge_cache_values(model, [px])
    tmp = Path(tempfile.mkdtemp())
    cache = FeatureCache(tmp, {"gpu": 1}, 32, {k: tuple(v.shape[1:]) for k, v in values.items()})
    cache.write(np.arange(32), values)
    cache.mark_done(np.arange(32))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    targets = (np.random.default_rng(0).random((32, 3)) < 0.4).astype(np.float32)
    hist = fit_method(MedBridgeMethod.from_model(model), TrainingData(cache, targets, np.arange(24), np.arange(24, 32)),
                      TrainConfig(epochs=2, batch_size=8, lr=1e-2), tmp / "run", device="cuda", progress_bar=False)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(model.get_parameter(n).requires_grad for n in changed)
    print(f"training on cuda (bf16 autocast): epochs {[round(h['val_macro_auroc'], 3) for h in hist]} val AUROC, "
          f"{len(changed)} adapter tensors changed, backbone unchanged")


PAPER_IMAGES, PAPER_VIEWS, PAPER_EPOCHS = 227_000, 5, 3


def towers(smoke: bool) -> list:
    """(name, backbone) of the timed towers: ViT-B/16 at random init and the bundled DINOv2-S (if converted)."""
    from medbridge.backbones.base import Backbone
    from medbridge.backbones.registry import tiny_builders

    if smoke:
        return [("tiny-timm-vit", tiny_builders()["tiny-timm-vit"]())]
    import timm

    from medbridge.backbones.timm_vit import timm_vision_tower

    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
    out = [("vit-b-16-random", Backbone("vit-b-16-random", timm_vision_tower(vit)))]
    try:
        from medbridge import create_backbone

        out.append(("dinov2-small", create_backbone("dinov2-small")))
    except Exception as exc:  # noqa: BLE001 - reported, the other tower still runs
        print(f"dinov2-small unavailable: {exc}")
    return out


def timings(name: str, bb, device: str, smoke: bool) -> dict:
    """Cache build views/s and training images/s without / from the cache on one tower (bf16 on CUDA)."""
    from medbridge.backbones.tiny import tiny_bert_text_tower
    from medbridge.methods.medbridge.model import MedBridgeConfig, MedBridgeModel

    torch.manual_seed(0)
    cfg = MedBridgeConfig(labels=[f"c{i}" for i in range(14)], backbones=["x"], num_queries=8,
                          t1=min(6, bb.vision.depth - 1))
    model = MedBridgeModel(cfg, [bb], text=tiny_bert_text_tower()).to(device)
    batch, views, size = (4, 2, bb.vision.preprocess.image_size) if smoke else (32, PAPER_VIEWS, 224)
    px = torch.randn(batch, views, 3, size, size, device=device)
    targets = (torch.rand(batch, 14, device=device) < 0.3).float()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def timed(fn, n=2 if smoke else 10):
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - t0) / n

    def build():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            return model.cacheable([px])

    cached = build()

    def step(use_cache):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            out = model.forward_cached(cached) if use_cache else model([px])
            loss = model.loss(out, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()

    t_build, t_plain, t_cached = timed(build), timed(lambda: step(False)), timed(lambda: step(True))
    res = {"tower": name, "views": views, "batch": batch, "cache_views_per_s": batch * views / t_build,
           "train_images_per_s_no_cache": batch / t_plain, "train_images_per_s_cached": batch / t_cached,
           "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    print(f"{name}, {views} views at {size}, batch {batch}{', bf16' if cuda else ''}: cache build "
          f"{res['cache_views_per_s']:.0f} views/s; training without cache {res['train_images_per_s_no_cache']:.1f}"
          f" images/s, from cache {res['train_images_per_s_cached']:.1f} images/s; peak GPU memory "
          f"{res['peak_gpu_gib'] or 0:.1f} GiB")
    return res


def decode_rates(data: Path, n: int, workers: int, cuda: bool) -> dict:
    """JPEG -> focal views (whole image, 224 px) in ``workers`` CPU DataLoader processes; nvJPEG batch decode."""
    from torch.utils.data import DataLoader

    from medbridge.backbones.base import PreprocessConfig
    from medbridge.data import FocalConfig, ViewDataset, collate_views, load_dataset

    table = load_dataset("nih", data).subset(range(n))
    pre = PreprocessConfig(224, (0.5,) * 3, (0.5,) * 3)
    ds = ViewDataset(table, FocalConfig(region_size=512, stride=512, num_crops=0), [pre])
    t0 = time.perf_counter()
    for _ in DataLoader(ds, batch_size=16, num_workers=workers, collate_fn=collate_views):
        pass
    res = {"decode_workers": workers, "decode_images_per_s_cpu": n / (time.perf_counter() - t0),
           "decode_images_per_s_nvjpeg": None}
    print(f"JPEG decode + views, {workers} CPU workers: {res['decode_images_per_s_cpu']:.0f} images/s")
    if cuda:
        try:
            from torchvision.io import decode_jpeg, read_file

            files = [read_file(str(p)) for p in table.paths]
            decode_jpeg(files[:4], device="cuda")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(0, n, 64):
                decode_jpeg(files[i:i + 64], device="cuda")
            torch.cuda.synchronize()
            res["decode_images_per_s_nvjpeg"] = n / (time.perf_counter() - t0)
            print(f"nvJPEG (torchvision decode_jpeg on cuda, batches of 64): "
                  f"{res['decode_images_per_s_nvjpeg']:.0f} images/s (decode only, no resize)")
        except Exception as exc:  # noqa: BLE001 - optional
            print(f"nvJPEG through torchvision unavailable: {exc}")
    return res


def predict_rates(data: Path, n: int, device: str, workers: int, smoke: bool) -> dict:
    """``predict_images`` on the NIH JPEGs (demo preset's MedBridge, untrained adapter) on ``device``, and the same
    images on the CPU: the largest probability difference, fp32 and bf16."""
    from medbridge.backbones.registry import tiny_builders
    from medbridge.engine.evaluate import predict_images
    from medbridge.methods import create_method
    from medbridge.methods.inference import BF16_TOLERANCE, FP32_TOLERANCE

    paths = sorted((data / "images").glob("*.jpg"))[:n]
    torch.manual_seed(0)
    bbs = [tiny_builders()["tiny-hf-clip"]()] if smoke else None
    method = create_method("medbridge", backbones=bbs, labels=[f"c{i}" for i in range(14)],
                           focal={"region_size": 512, "stride": 512, "num_crops": 0})
    batch = 4 if smoke else 64
    predict_images(method, paths[:batch], batch_size=batch, device=device, workers=0)  # warm-up
    t0 = time.perf_counter()
    rows = predict_images(method, paths, batch_size=batch, device=device, workers=workers)
    res = {"predict_images_per_s": len(paths) / (time.perf_counter() - t0), "predict_batch": batch}
    print(f"predict ({device}, batch {batch}, {workers} workers): {res['predict_images_per_s']:.0f} images/s")
    k = min(len(paths), 32)

    def probs(r):
        return np.array([list(x["probabilities"].values()) for x in r])

    cpu = probs(predict_images(method, paths[:k], batch_size=batch, device="cpu", workers=0))
    for amp, tol in ((False, FP32_TOLERANCE), (True, BF16_TOLERANCE)):
        dev = probs(predict_images(method, paths[:k], batch_size=batch, device=device, workers=0, amp=amp))
        diff = float(np.abs(dev - cpu).max())
        res[f"max_abs_diff_vs_cpu_{'bf16' if amp else 'fp32'}"] = diff
        print(f"predictions {device} ({'bf16' if amp else 'fp32'}) vs cpu: max |diff| {diff:.2e} (tolerance {tol})")
        assert diff <= tol, f"{device} predictions differ from the CPU's by {diff} > {tol}"
    assert len(rows) == len(paths)
    return res


def projection(rates: dict, tower: dict) -> dict:
    """Wall time of the paper setting (``PAPER_IMAGES`` images, 5 views, 3 epochs) from the measured rates:
    cache build bounded by decode or the frozen forward, then epochs from the cache; or every epoch from JPEG."""
    n = PAPER_IMAGES
    decode = rates["decode_images_per_s_cpu"]
    build = n / min(decode, tower["cache_views_per_s"] / PAPER_VIEWS)
    cached = build + PAPER_EPOCHS * n / tower["train_images_per_s_cached"]
    plain = PAPER_EPOCHS * n / min(decode, tower["train_images_per_s_no_cache"])
    out = {"tower": tower["tower"], "cache_build_h": build / 3600, "train_from_cache_h": cached / 3600,
           "train_without_cache_h": plain / 3600, "predict_all_h": n / rates["predict_images_per_s"] / 3600}
    print(f"projected paper setting ({n} images, {PAPER_VIEWS} views, {PAPER_EPOCHS} epochs) on {tower['tower']}: "
          f"cache build {out['cache_build_h']:.2f} h, then training {out['train_from_cache_h']:.2f} h in all; "
          f"without a cache {out['train_without_cache_h']:.2f} h; predicting every image {out['predict_all_h']:.2f} h")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("NIH", "/tmp/b/nih-cxr14-sample"))
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny towers, few images: check that every path runs")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    from medbridge.methods.inference import default_workers

    workers = default_workers()
    n = 16 if args.smoke else 512
    t0 = time.perf_counter()
    out = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if cuda else "cpu (smoke run)"}
    print(out["torch"], out["device"])
    if cuda:
        exactness()
        training()
    out["rates"] = {**decode_rates(Path(args.data), n, workers, cuda),
                    **predict_rates(Path(args.data), n, device, workers, args.smoke)}
    out["towers"] = [timings(name, bb, device, args.smoke) for name, bb in towers(args.smoke)]
    out["projection"] = [projection(out["rates"], t) for t in out["towers"]]
    out["wall_s"] = time.perf_counter() - t0
    print(f"gpu_check: {out['wall_s']:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
