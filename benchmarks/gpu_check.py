"""GPU check and timings of the engine's hot paths (run on a CUDA machine; random weights, no downloads).

    python benchmarks/gpu_check.py

1. Exactness on GPU: tiny MedBridge model, cached vs direct forward on CUDA (fp32) and vs CPU; bf16 autocast
   close to fp32.
2. Training on CUDA with bf16 autocast through the shared loop ``fit_method`` (loss finite, adapter changes,
   backbone not).
3. Timings on a ViT-B/16-sized model (timm vit_base_patch16_224, random init, 224 px, 5 views, T1 = 6, Q = 8):
   cache building views/s, training images/s without cache vs from the isolated-mode cache (same batch).
"""

from __future__ import annotations

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
    hist = fit_method(MedBridgeMethod(model), TrainingData(cache, targets, np.arange(24), np.arange(24, 32)),
                      TrainConfig(epochs=2, batch_size=8, lr=1e-2), tmp / "run", device="cuda", progress_bar=False)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(model.get_parameter(n).requires_grad for n in changed)
    print(f"training on cuda (bf16 autocast): epochs {[round(h['val_macro_auroc'], 3) for h in hist]} val AUROC, "
          f"{len(changed)} adapter tensors changed, backbone unchanged")


def timings() -> None:
    import timm

    from medbridge.backbones.base import Backbone
    from medbridge.backbones.timm_vit import timm_vision_tower
    from medbridge.backbones.tiny import tiny_bert_text_tower
    from medbridge.methods.medbridge.model import MedBridgeConfig, MedBridgeModel

    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
    bb = Backbone("vit-b-16-random", timm_vision_tower(vit))
    cfg = MedBridgeConfig(labels=[f"c{i}" for i in range(14)], backbones=["x"], num_queries=8, t1=6)
    model = MedBridgeModel(cfg, [bb], text=tiny_bert_text_tower()).cuda()
    batch, views = 32, 5
    px = torch.randn(batch, views, 3, 224, 224, device="cuda")
    targets = (torch.rand(batch, 14, device="cuda") < 0.3).float()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)

    def timed(fn, n=10):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n

    def build():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return model.cacheable([px])

    cached = build()

    def step(use_cache):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.forward_cached(cached) if use_cache else model([px])
            loss = model.loss(out, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()

    t_build = timed(build)
    t_plain = timed(lambda: step(False))
    t_cached = timed(lambda: step(True))
    print(f"ViT-B/16 (random), {views} views at 224, batch {batch}, bf16: cache build {batch * views / t_build:.0f} "
          f"views/s; training without cache {batch / t_plain:.0f} images/s, from cache {batch / t_cached:.0f} "
          f"images/s ({t_plain / t_cached:.1f}x); peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(0))
    exactness()
    training()
    timings()
