"""Linear probe: per-class logistic regression on frozen image embeddings (the baseline a user tries first).

Features per expert: the frozen pooled embedding of the whole image ("whole"), optionally concatenated with the
mean over the focal crops ("whole+mean"). Standardised; the L2 strength C is chosen on the validation split by
macro AUROC. Saved like an adapter: ``probe.safetensors`` + ``probe_config.json``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..data.focal import FocalConfig
from ..io import CorruptFileError, atomic_write_bytes, load_tensors, read_json, save_tensors

PROBE_WEIGHTS = "probe.safetensors"
PROBE_CONFIG = "probe_config.json"
PROBE_FORMAT = "medbridge-probe/1"
FEATURES = ("whole", "whole+mean")


@dataclass
class ProbeConfig:
    C: list = field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0])  # candidate inverse L2 strengths
    features: str = "whole+mean"  # "whole" (whole-image embedding) or "whole+mean" (+ mean over crops)
    max_iter: int = 2000

    def __post_init__(self) -> None:
        if self.features not in FEATURES:
            raise ValueError(f"probe.features must be one of {FEATURES}, got {self.features!r}")
        self.C = [float(c) for c in (self.C if isinstance(self.C, (list, tuple)) else [self.C])]
        if not self.C or min(self.C) <= 0:
            raise ValueError(f"probe.C must be positive numbers, got {self.C}")


def probe_features(frozen: list[Tensor], features: str, has_whole: bool = True) -> Tensor:
    """Per expert pooled frozen embeddings [B, N, E] (view 0 = whole image) -> features [B, D]."""
    parts = []
    for f in frozen:
        f = f.float()
        parts.append(f[:, 0])
        if features == "whole+mean" and f.shape[1] > 1:
            parts.append(f[:, 1:].mean(1) if has_whole else f.mean(1))
    return torch.cat(parts, dim=-1)


def check_probe_shapes(t: dict[str, Tensor], labels: list[str], path: Path) -> None:
    """weight [L, D], bias [L], mean/std [D] for the L labels of the config; anything else is an error."""
    missing = sorted({"weight", "bias", "mean", "std"} - set(t))
    if missing:
        raise CorruptFileError(f"{path}: tensors {missing} missing")
    n, w = len(labels), t["weight"]
    d = w.shape[1] if w.ndim == 2 else -1
    expected = {"weight": (n, d), "bias": (n,), "mean": (d,), "std": (d,)}
    wrong = [f"{k} {tuple(t[k].shape)} (expected {v})" for k, v in expected.items() if tuple(t[k].shape) != v]
    if wrong or d < 1:
        raise CorruptFileError(f"{path}: shapes do not fit the {n} labels of its config: " + ", ".join(wrong))


class LinearProbe(nn.Module):
    """logits = ((x - mean) / std) @ W.T + b on :func:`probe_features`."""

    def __init__(self, labels: list[str], weight: Tensor, bias: Tensor, mean: Tensor, std: Tensor,
                 meta: dict) -> None:
        super().__init__()
        self.labels = list(labels)
        self.meta = meta
        for name, t in (("weight", weight), ("bias", bias), ("mean", mean), ("std", std)):
            self.register_buffer(name, t.float())

    def forward(self, features: Tensor) -> Tensor:
        return ((features - self.mean) / self.std) @ self.weight.T + self.bias

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        digest = save_tensors(folder / PROBE_WEIGHTS, dict(self.state_dict()))
        atomic_write_bytes(folder / PROBE_CONFIG, json.dumps({"format": PROBE_FORMAT, "method": "linear-probe",
                                                              "labels": self.labels, **self.meta,
                                                              "weights_sha256": digest}, indent=1).encode())
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> LinearProbe:
        folder = Path(folder)
        cfg_path = folder / PROBE_CONFIG
        if not cfg_path.is_file():
            raise FileNotFoundError(f"no linear probe at {folder} (expected {PROBE_CONFIG}, {PROBE_WEIGHTS})")
        meta = read_json(cfg_path, "linear-probe config")
        if meta.get("format") != PROBE_FORMAT:
            raise ValueError(f"{cfg_path}: format {meta.get('format')!r}, expected {PROBE_FORMAT!r}")
        t = load_tensors(folder / PROBE_WEIGHTS, meta.pop("weights_sha256", None))
        labels = meta.pop("labels")
        meta.pop("format")
        meta.pop("method")
        check_probe_shapes(t, labels, folder / PROBE_WEIGHTS)
        return cls(labels, t["weight"], t["bias"], t["mean"], t["std"], meta)

    @property
    def focal(self) -> FocalConfig:
        return FocalConfig(**self.meta["focal"])


def fit_linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray | None, y_val: np.ndarray | None,
                     labels: list[str], cfg: ProbeConfig, meta: dict) -> tuple[LinearProbe, dict]:
    """One L2-regularised logistic regression per class (unknown targets skipped), C picked on validation."""
    from sklearn.linear_model import LogisticRegression

    from ..engine.metrics import evaluate_scores

    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xs = (x_train - mean) / std
    xv = None if x_val is None else (x_val - mean) / std
    results = {}
    for c in cfg.C:
        w = np.zeros((len(labels), xs.shape[1]), dtype=np.float64)
        b = np.zeros(len(labels), dtype=np.float64)
        for j in range(len(labels)):
            known = ~np.isnan(y_train[:, j])
            y = y_train[known, j]
            if len(np.unique(y)) < 2:  # one class only: constant prior logit
                p = np.clip(y.mean() if len(y) else 0.5, 1e-3, 1 - 1e-3)
                b[j] = np.log(p / (1 - p))
                continue
            clf = LogisticRegression(C=c, max_iter=cfg.max_iter).fit(xs[known], y)
            w[j], b[j] = clf.coef_[0], clf.intercept_[0]
        score = float("nan")
        if xv is not None and y_val is not None:
            score = evaluate_scores(xv @ w.T + b, y_val, labels)["macro"]["auroc"]
        results[c] = (w, b, score)
    best = max(results, key=lambda c: (np.nan_to_num(results[c][2], nan=-1), -abs(np.log10(c) + 2)))
    w, b, score = results[best]
    info = {"C": best, "val_auroc_by_C": {str(c): r[2] for c, r in results.items()}}
    probe = LinearProbe(labels, torch.from_numpy(w), torch.from_numpy(b), torch.from_numpy(mean),
                        torch.from_numpy(std), {**meta, "probe": asdict(cfg), **info})
    return probe, info
