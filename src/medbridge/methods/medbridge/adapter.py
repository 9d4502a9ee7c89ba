"""Adapter files: only the trainable tensors (safetensors) + a JSON config; loaded back onto frozen backbones."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...backbones import Backbone, create_backbone, create_text_tower
from ...io import atomic_write_bytes, load_tensors, read_json, save_tensors
from .model import MedBridgeConfig, MedBridgeModel

WEIGHTS = "adapter.safetensors"
CONFIG = "adapter_config.json"
FORMAT = "medbridge-adapter/1"


class AdapterMismatchError(RuntimeError):
    """The adapter was trained on other backbones (or another architecture) than the ones given."""


def backbone_fingerprint(backbone: Backbone) -> dict:
    """Architecture facts plus a checksum of a few frozen weights: tells one backbone from another."""
    v = backbone.vision
    with torch.no_grad():
        params = list(v.parameters())
        probe = [params[0], params[len(params) // 2], params[-1]]
        checksum = float(sum(p.detach().cpu().double().abs().sum() for p in probe))  # same on any device
    return {"name": backbone.name, "width": v.width, "depth": v.depth, "embed_dim": v.embed_dim,
            "image_size": v.preprocess.image_size, "checksum": round(checksum, 3)}


def build_medbridge(config: MedBridgeConfig, backbones: list[Backbone] | None = None) -> MedBridgeModel:
    """Create (or reuse) the frozen backbones named by the config and build the model around them."""
    backbones = backbones or [create_backbone(s) for s in config.backbones]
    text = None if isinstance(config.text_source, int) else create_text_tower(config.text_source)
    return MedBridgeModel(config, backbones, text)


def save_adapter(model: MedBridgeModel, folder: str | Path, extra: dict | None = None) -> Path:
    """Write ``adapter.safetensors`` (trainable tensors only) and ``adapter_config.json`` atomically."""
    folder = Path(folder)
    digest = save_tensors(folder / WEIGHTS, model.adapter_tensors())
    meta = {
        "format": FORMAT, "method": "medbridge", "config": model.config.to_dict(),
        "backbones": [backbone_fingerprint(b) for b in model.backbones],
        "text_projection_init": model.text_head.init, "parameters": model.parameter_report(),
        "weights_sha256": digest, **(extra or {}),
    }
    atomic_write_bytes(folder / CONFIG, json.dumps(meta, indent=1).encode())
    return folder


def read_adapter_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no adapter config at {path} (expected {CONFIG} and {WEIGHTS})")
    meta = read_json(path, "adapter config")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown adapter format {meta.get('format')!r} (expected {FORMAT})")
    return meta


def load_adapter(folder: str | Path, backbones: list[Backbone] | None = None) -> MedBridgeModel:
    """Rebuild a saved MedBridge model; ``backbones`` defaults to those named in the adapter config."""
    folder = Path(folder)
    meta = read_adapter_config(folder)
    config = MedBridgeConfig(**{"feature_norm": "none", **meta["config"]})  # adapters older than feature_norm
    model = build_medbridge(config, backbones)
    for k, (saved, b) in enumerate(zip(meta["backbones"], model.backbones)):
        now = backbone_fingerprint(b)
        diffs = [f"{key}: adapter {saved[key]} vs given {now[key]}" for key in ("width", "depth", "embed_dim",
                 "image_size", "checksum") if saved[key] != now[key]]
        if diffs:
            raise AdapterMismatchError(f"{folder}: expert {k} was trained on backbone {saved['name']!r} but "
                                       f"{now['name']!r} differs ({'; '.join(diffs)})")
    tensors = load_tensors(folder / WEIGHTS, meta.get("weights_sha256"))
    own = model.adapter_tensors()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise AdapterMismatchError(f"{folder / WEIGHTS}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, p in own.items():
            if p.shape != tensors[name].shape:
                raise AdapterMismatchError(f"{name}: shape {tuple(tensors[name].shape)} in file, "
                                           f"{tuple(p.shape)} in model")
            p.copy_(tensors[name])
    return model.eval()
