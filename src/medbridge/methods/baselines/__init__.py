"""Baseline adaptation methods (specs/baselines.md), one module per family, registered by name."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...backbones import Backbone, create_backbone
from ...io import CorruptFileError, atomic_write_bytes, load_tensors, read_json, save_tensors
from .adapters import ClipAdapter, LPText
from .base import FeatureMethod, Hparams, NotApplicableError, require_aligned_text
from .mma import MMA
from .mmrl import MMRL
from .prompt_learning import CoCoOp, CoOp, KgCoOp, ProGrad, PromptLearner
from .zero_shot import ZeroShot

#: Feature-space baselines (frozen image features, cached): name -> class. Linear probe lives in
#: methods/linear_probe.py; MedBridge in methods/medbridge/.
BASELINES: dict[str, type[FeatureMethod]] = {
    "zero-shot": ZeroShot, "coop": CoOp, "cocoop": CoCoOp, "kgcoop": KgCoOp, "prograd": ProGrad,
    "clip-adapter": ClipAdapter, "lp-text": LPText, "mma": MMA, "mmrl": MMRL,
}
#: In the paper's Table 1 but not implemented yet (token-inserting methods): a clear error names them.
NOT_YET: dict[str, str] = {}
BASELINE_FORMAT = "medbridge-baseline/1"
WEIGHTS, CONFIG = "baseline.safetensors", "baseline_config.json"


def build_baseline(name: str, backbone: Backbone, labels: list[str], names: list[str], **kwargs) -> FeatureMethod:
    if name in NOT_YET:
        raise NotApplicableError(f"{NOT_YET[name]} is not implemented yet in this version of medbridge")
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)} (or medbridge, linear-probe)")
    return BASELINES[name](backbone, labels, names, **kwargs)


def save_baseline(method: FeatureMethod, folder: str | Path, extra: dict | None = None) -> Path:
    """Trainable tensors and non-backbone buffers (safetensors) + JSON config; never the frozen backbone."""
    folder = Path(folder)
    state = {k: v for k, v in method.state_dict().items() if not k.startswith(("backbone.", "prompt.text."))}
    digest = save_tensors(folder / WEIGHTS, state)
    meta = {"format": BASELINE_FORMAT, "method": method.name, "labels": method.labels, "names": method.names,
            "template": method.template, "backbone": method.backbone.name, "config": method.config(),
            "trainable_parameters": sum(p.numel() for p in method.trainable_parameters().values()),
            "weights_sha256": digest, **(extra or {})}
    atomic_write_bytes(folder / CONFIG, json.dumps(meta, indent=1).encode())
    return folder


def load_baseline(folder: str | Path, backbone: Backbone | None = None) -> FeatureMethod:
    folder = Path(folder)
    meta = read_json(folder / CONFIG, "baseline config")
    if meta.get("format") != BASELINE_FORMAT:
        raise ValueError(f"{folder / CONFIG}: format {meta.get('format')!r}, expected {BASELINE_FORMAT!r}")
    backbone = backbone or create_backbone(meta["backbone"])
    method = build_baseline(meta["method"], backbone, meta["labels"], meta["names"], template=meta["template"],
                            **meta.get("config", {}))
    state = load_tensors(folder / WEIGHTS, meta.get("weights_sha256"))
    own = method.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})" for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise CorruptFileError(f"{folder / WEIGHTS}: shapes do not fit the {len(meta['labels'])} labels and config "
                               "of its JSON: " + ", ".join(wrong[:4]))
    missing, unexpected = method.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("backbone.", "prompt.text."))]
    if missing or unexpected:
        raise ValueError(f"{folder}: saved {meta['method']} does not match: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}")
    return method.eval()


def fit_feature_method(method: FeatureMethod, x_train: torch.Tensor, y_train: torch.Tensor,
                       x_val: torch.Tensor | None = None, y_val: torch.Tensor | None = None,
                       hp: Hparams | None = None, seed: int = 0, progress: bool = False) -> dict:
    """Train a feature-space method: its own ``fit_features`` if it has one, else mini-batches with its optimiser
    (SGD momentum 0.9 or AdamW), constant warmup at 1e-5 then cosine per epoch (Dassl), last-epoch model."""
    import math

    import numpy as np

    hp = hp or method.default_hparams
    torch.manual_seed(seed)
    method.init_from_features(x_train)
    info = method.fit_features(x_train, y_train, x_val, y_val, hp)
    if info is not None:
        return info
    params = list(method.trainable_parameters().values())
    if not params:
        return {"epochs": 0}
    if hp.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    losses = []
    for epoch in range(hp.epochs):
        if epoch < hp.warmup_epochs:
            lr = 1e-5
        else:
            span = max(hp.epochs - hp.warmup_epochs, 1)
            lr = 0.5 * hp.lr * (1 + math.cos(math.pi * (epoch - hp.warmup_epochs) / span))
        for g in opt.param_groups:
            g["lr"] = lr
        perm = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(len(x_train)))
        for i in range(0, len(perm), hp.batch_size):
            rows = perm[i:i + hp.batch_size]
            loss = method.train_step(x_train[rows], y_train[rows], opt)
            if not torch.isfinite(loss):
                raise RuntimeError(f"{method.name}: loss is {loss.item()} at epoch {epoch + 1}")
        losses.append(float(loss))
    return {"epochs": hp.epochs, "final_loss": losses[-1] if losses else None}


__all__ = ["BASELINES", "NOT_YET", "FeatureMethod", "Hparams", "NotApplicableError", "PromptLearner",
           "build_baseline", "save_baseline", "load_baseline", "fit_feature_method", "require_aligned_text",
           "ZeroShot", "CoOp", "CoCoOp", "KgCoOp", "ProGrad", "ClipAdapter", "LPText", "MMA", "MMRL"]
