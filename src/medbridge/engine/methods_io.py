"""Trained methods behind one interface for evaluation and prediction: MedBridge adapters and linear probes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..backbones import Backbone, create_backbone
from ..data.focal import FocalConfig
from ..methods.linear_probe import PROBE_CONFIG, LinearProbe, probe_features
from ..methods.medbridge.adapter import CONFIG as ADAPTER_CONFIG
from ..methods.medbridge.adapter import backbone_fingerprint, load_adapter
from ..methods.medbridge.model import MedBridgeModel
from .cache import FeatureCache
from .features import CacheSpec
from .trainer import medbridge_cache_values, predict_cached, split_cached


class TrainedMethod:
    """A trained classifier: scores from cached activations or from views, for its own labels."""

    name: str
    labels: list[str]
    focal: FocalConfig
    preprocess: list

    def cache_spec(self, n_views: int) -> CacheSpec:
        raise NotImplementedError

    def to(self, device: str) -> TrainedMethod:
        """Move the frozen backbones (which compute the cache) to ``device``; scoring happens there too."""
        for b in self.backbone_modules():
            b.to(device)
        return self

    def backbone_modules(self) -> list:
        return []

    def scores_cached(self, cache: FeatureCache, rows: np.ndarray, device: str = "cpu") -> np.ndarray:
        raise NotImplementedError

    def scores_views(self, pixels: list[torch.Tensor]) -> tuple[np.ndarray, dict]:
        raise NotImplementedError


class MedBridgeMethod(TrainedMethod):
    name = "medbridge"

    def __init__(self, model: MedBridgeModel, labels: list[str] | None = None,
                 prompt_names: list[str] | None = None) -> None:
        """``labels``/``prompt_names``: score other label names than the trained ones (text prompts)."""
        self.model = model.eval()
        self.labels = list(labels or model.config.labels)
        self.prompt_names = prompt_names
        self.focal = model.config.focal
        self.preprocess = model.preprocess

    def backbone_modules(self) -> list:
        return [self.model]

    def cache_spec(self, n_views: int) -> CacheSpec:
        shapes = {}
        for k, enc in enumerate(self.model.encoders):
            v = enc.vision
            dev = next(v.parameters()).device
            size = v.preprocess.image_size
            n_tokens = enc.prefix(torch.zeros(1, 3, size, size, device=dev)).shape[1]
            if enc.attention == "joint":
                shapes[f"e{k}.prefix"] = (n_views, n_tokens, v.width)
            else:
                shapes[f"e{k}.states"] = (n_views, v.depth - enc.t1, n_tokens, v.width)
                shapes[f"e{k}.frozen"] = (n_views, v.embed_dim)
        parts = {"what": "medbridge-frozen", "backbones": [backbone_fingerprint(b) for b in self.model.backbones],
                 "t1": [e.t1 for e in self.model.encoders], "attention": self.model.config.attention,
                 "focal": self.focal.to_dict(), "preprocess": [p.to_dict() for p in self.preprocess]}
        spec = CacheSpec(parts, shapes, lambda px: medbridge_cache_values(self.model, px), self.focal,
                         self.preprocess)
        if "e0.states" in shapes:  # train.cache=prefix: store block T1 only, rerun the frozen blocks each step
            prefix = {f"e{k}.prefix": (n_views, *shapes[f"e{k}.states"][2:]) for k in range(len(self.model.encoders))}
            spec.alternatives["prefix"] = CacheSpec(
                {**parts, "what": "medbridge-prefix"}, prefix, lambda px: {
                    f"e{k}.prefix": t for k, t in enumerate(self.model.prefix_tokens(px))}, self.focal, self.preprocess)
        return spec

    def scores_cached(self, cache, rows, device="cpu"):
        return predict_cached(self.model.to(device), cache, rows, device=device, labels=self.labels,
                              prompt_names=self.prompt_names)

    def scores_views(self, pixels):
        with torch.no_grad():
            out = self.model(pixels, self.labels, self.prompt_names)
        return torch.sigmoid(out.logits).numpy(), {"gate": out.gate.numpy(), "view_votes": out.view_votes.numpy()}


def frozen_embeddings(backbones: list[Backbone], pixels: list[torch.Tensor]) -> list[torch.Tensor]:
    """Pooled output of each frozen backbone for every view: [B, N, E] per expert."""
    out = []
    with torch.no_grad():
        for b, px in zip(backbones, pixels):
            v = b.vision
            e = v.finalize(v.run_blocks(v.embed(px.flatten(0, 1)), 0))
            out.append(e.view(px.shape[0], px.shape[1], -1))
    return out


def embedding_cache_spec(backbones: list[Backbone], focal: FocalConfig, n_views: int) -> CacheSpec:
    """Cache of the frozen pooled embeddings of every view (what a linear probe needs)."""
    preprocess = [b.vision.preprocess for b in backbones]
    shapes = {f"e{k}.frozen": (n_views, b.vision.embed_dim) for k, b in enumerate(backbones)}
    parts = {"what": "frozen-embeddings", "backbones": [backbone_fingerprint(b) for b in backbones],
             "focal": focal.to_dict(), "preprocess": [p.to_dict() for p in preprocess]}

    def compute(pixels: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"e{k}.frozen": e for k, e in enumerate(frozen_embeddings(backbones, pixels))}

    return CacheSpec(parts, shapes, compute, focal, preprocess)


def cached_probe_features(cache: FeatureCache, rows: np.ndarray, n_experts: int, features: str,
                          has_whole: bool) -> torch.Tensor:
    names = [f"e{k}.frozen" for k in range(n_experts)]
    values = split_cached(cache.read(rows, names), n_experts, "cpu")
    return probe_features([v["frozen"] for v in values], features, has_whole)


class ProbeMethod(TrainedMethod):
    name = "linear-probe"

    def __init__(self, probe: LinearProbe, backbones: list[Backbone]) -> None:
        self.probe = probe.eval()
        self.backbones = backbones
        self.labels = probe.labels
        self.focal = probe.focal
        self.preprocess = [b.vision.preprocess for b in backbones]

    def backbone_modules(self) -> list:
        return list(self.backbones)

    def cache_spec(self, n_views: int) -> CacheSpec:
        return embedding_cache_spec(self.backbones, self.focal, n_views)

    def scores_cached(self, cache, rows, device="cpu"):
        feats = cached_probe_features(cache, rows, len(self.backbones), self.probe.meta["probe"]["features"],
                                      self.focal.include_whole)
        with torch.no_grad():
            return torch.sigmoid(self.probe(feats)).numpy()

    def scores_views(self, pixels):
        feats = probe_features(frozen_embeddings(self.backbones, pixels), self.probe.meta["probe"]["features"],
                               self.focal.include_whole)
        with torch.no_grad():
            return torch.sigmoid(self.probe(feats)).numpy(), {}


def baseline_cache_spec(method) -> CacheSpec:
    """What a feature-space baseline trains on: the pooled whole-image embedding, or (MMA) the vision tokens after
    its first ``cache_prefix_blocks`` frozen blocks."""
    focal = FocalConfig(num_crops=0)
    t = getattr(method, "cache_prefix_blocks", None)
    if t is None:
        return embedding_cache_spec([method.backbone], focal, 1)
    v = method.backbone.vision
    size = v.preprocess.image_size
    dev = next(v.parameters()).device
    with torch.no_grad():
        n_tokens = v.run_blocks(v.embed(torch.zeros(1, 3, size, size, device=dev)), 0, t).shape[1]

    def compute(pixels: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        px = pixels[0]
        out = v.run_blocks(v.embed(px.flatten(0, 1)), 0, t)
        return {"e0.prefix": out.view(px.shape[0], px.shape[1], *out.shape[1:])}

    parts = {"what": f"vision-prefix-{t}", "backbones": [backbone_fingerprint(method.backbone)],
             "focal": focal.to_dict(), "preprocess": [v.preprocess.to_dict()]}
    return CacheSpec(parts, {"e0.prefix": (1, n_tokens, v.width)}, compute, focal, [v.preprocess])


def baseline_features(cache: FeatureCache, rows: np.ndarray, method) -> torch.Tensor:
    name = "e0.frozen" if getattr(method, "cache_prefix_blocks", None) is None else "e0.prefix"
    return cache.read(rows, [name])[name][:, 0].float()


class BaselineIO(TrainedMethod):
    """A feature-space baseline: whole image at the backbone's input size, frozen pooled embedding -> logits."""

    def __init__(self, method) -> None:
        self.method = method.eval()
        self.name = method.name
        self.labels = method.labels
        self.focal = FocalConfig(num_crops=0)
        self.preprocess = [method.backbone.vision.preprocess]
        self._spec: CacheSpec | None = None

    def backbone_modules(self) -> list:
        return [self.method]

    def to(self, device: str) -> TrainedMethod:
        self._spec = None  # the spec's probe tensors live on the device
        return super().to(device)

    def cache_spec(self, n_views: int) -> CacheSpec:
        if self._spec is None:
            self._spec = baseline_cache_spec(self.method)
        return self._spec

    def features_cached(self, cache: FeatureCache, rows: np.ndarray) -> torch.Tensor:
        return baseline_features(cache, rows, self.method)

    def scores_cached(self, cache, rows, device="cpu"):
        with torch.no_grad():
            feats = self.features_cached(cache, rows).to(next(self.method.parameters()).device)
            return torch.sigmoid(self.method(feats)).cpu().numpy()

    def scores_views(self, pixels):
        with torch.no_grad():
            feats = self.cache_spec(1).compute(pixels)
            feats = next(iter(feats.values()))[:, 0]
            return torch.sigmoid(self.method(feats)).cpu().numpy(), {}


def load_method(folder: str | Path, backbones: list[Backbone] | None = None) -> TrainedMethod:
    """A MedBridge adapter folder, a linear-probe folder, or a run folder (its ``medbridge/`` adapter, else its
    ``linear_probe/``)."""
    from ..methods.baselines import BASELINES, load_baseline
    from ..methods.baselines import CONFIG as BASELINE_CONFIG

    folder = Path(folder)
    for cand in (folder, folder / "medbridge", folder / "linear_probe", *(folder / n for n in BASELINES)):
        if (cand / BASELINE_CONFIG).is_file():
            return BaselineIO(load_baseline(cand, backbones[0] if backbones else None))
        if (cand / ADAPTER_CONFIG).is_file():
            return MedBridgeMethod(load_adapter(cand, backbones))
        if (cand / PROBE_CONFIG).is_file():
            probe = LinearProbe.load(cand)
            bbs = backbones or [create_backbone(s) for s in probe.meta["backbones"]]
            return ProbeMethod(probe, bbs)
    raise FileNotFoundError(f"{folder}: no trained method found (expected {ADAPTER_CONFIG} or {PROBE_CONFIG}, "
                            "directly or in medbridge/ or linear_probe/ of a run folder)")
