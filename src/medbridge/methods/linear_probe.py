"""Linear probe: per-class logistic regression on frozen image embeddings (the baseline a user tries first).

Features per expert: the frozen pooled embedding of the whole image ("whole"), optionally concatenated with the
mean over the focal crops ("whole+mean"). Standardised; the L2 strength C is chosen on the validation split by
macro AUROC (closed-form fit: scikit-learn, no mini-batch loop)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..backbones.base import Backbone
from ..data.focal import FocalConfig
from .api import CacheSpec, ClosedFormFit, Explainable, Method, OptionsError, TrainingData
from .frozen_features import embedding_cache_spec, frozen_embeddings, has_embeddings, read_embeddings
from .selection import macro_auroc

FEATURES = ("whole", "whole+mean")


@dataclass
class ProbeConfig:
    C: list = field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0],
                    metadata={"help": "candidate inverse L2 strengths, chosen on validation macro AUROC"})
    features: str = field(default="whole+mean", metadata={"help": "whole, or whole+mean (adds the mean over crops)"})
    max_iter: int = field(default=2000, metadata={"help": "logistic regression iterations"})

    def __post_init__(self) -> None:
        if self.features not in FEATURES:
            raise OptionsError(f"features must be one of {FEATURES}, got {self.features!r}")
        self.C = [float(c) for c in (self.C if isinstance(self.C, (list, tuple)) else [self.C])]
        if not self.C or min(self.C) <= 0:
            raise OptionsError(f"C must be positive numbers, got {self.C}")


def probe_features(frozen: list[Tensor], features: str, has_whole: bool = True) -> Tensor:
    """Per expert pooled frozen embeddings [B, N, E] (view 0 = whole image) -> features [B, D]."""
    parts = []
    for f in frozen:
        f = f.float()
        parts.append(f[:, 0])
        if features == "whole+mean" and f.shape[1] > 1:
            parts.append(f[:, 1:].mean(1) if has_whole else f.mean(1))
    return torch.cat(parts, dim=-1)


class LinearProbe(Explainable, ClosedFormFit, Method):
    """Linear probe: logits = ((x - mean) / std) @ W.T + b on the frozen embeddings (logistic regression)."""

    name = "linear-probe"
    folder_name = "linear_probe"
    seed_dependent = False  # a deterministic closed-form fit: a seed ensemble would repeat it

    def __init__(self, options: ProbeConfig, backbones: list[Backbone], labels: list[str], prompt_names: list[str],
                 focal: FocalConfig) -> None:
        super().__init__(options, backbones, labels, prompt_names, focal)
        dim = sum(b.vision.embed_dim * (2 if options.features == "whole+mean" and focal.max_views(1024, 1024) > 1
                                        else 1) for b in backbones)
        self.register_buffer("weight", torch.zeros(len(labels), dim))
        self.register_buffer("bias", torch.zeros(len(labels)))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.fit_info: dict = {}

    def forward(self, features: Tensor) -> Tensor:
        if features.shape[-1] != self.mean.shape[0]:  # options/focal views that do not match the saved weights
            from ..io import CorruptFileError

            raise CorruptFileError(f"{getattr(self, 'source', 'linear probe')}: these images give {features.shape[-1]}"
                                   f" features (features={self.options.features!r}, focal views "
                                   f"{self.focal.to_dict()}) but the probe's weights take {self.mean.shape[0]}: its "
                                   "options or focal views do not match the weights it was fitted with")
        return ((features - self.mean) / self.std) @ self.weight.T + self.bias

    def cache_spec(self, n_views: int) -> CacheSpec:
        return embedding_cache_spec(self.backbones, self.focal, n_views)

    def reads(self, spec: CacheSpec, n_views: int) -> bool:
        return has_embeddings(spec, self.backbones, self.focal)

    def features_cached(self, cache: Any, rows: np.ndarray) -> Tensor:
        return probe_features(read_embeddings(cache, rows, len(self.backbones)), self.options.features,
                              self.focal.include_whole)

    def fit_closed_form(self, data: TrainingData) -> dict:
        """One L2-regularised logistic regression per class (unknown targets skipped), C picked on validation."""
        from sklearn.linear_model import LogisticRegression

        x_train = self.features_cached(data.cache, data.train_rows).numpy()
        y_train = data.targets[data.train_rows]
        has_val = len(data.val_rows) > 0
        x_val = self.features_cached(data.cache, data.val_rows).numpy() if has_val else None
        y_val = data.targets[data.val_rows] if has_val else None
        if x_train.shape[1] != self.weight.shape[1]:  # crops absent from these images: whole only
            self._resize(x_train.shape[1])
        mean, std = x_train.mean(0), x_train.std(0) + 1e-6
        xs = (x_train - mean) / std
        xv = None if x_val is None else (x_val - mean) / std
        results = {}
        for c in self.options.C:
            w = np.zeros((len(self.labels), xs.shape[1]), dtype=np.float64)
            b = np.zeros(len(self.labels), dtype=np.float64)
            for j in range(len(self.labels)):
                known = ~np.isnan(y_train[:, j])
                y = y_train[known, j]
                if len(np.unique(y)) < 2:  # one class only: constant prior logit
                    p = np.clip(y.mean() if len(y) else 0.5, 1e-3, 1 - 1e-3)
                    b[j] = np.log(p / (1 - p))
                    continue
                clf = LogisticRegression(C=c, max_iter=self.options.max_iter).fit(xs[known], y)
                w[j], b[j] = clf.coef_[0], clf.intercept_[0]
            score = macro_auroc(xv @ w.T + b, y_val) if xv is not None else float("nan")
            results[c] = (w, b, score)
        best = max(results, key=lambda c: (np.nan_to_num(results[c][2], nan=-1), -abs(np.log10(c) + 2)))
        w, b, _ = results[best]
        with torch.no_grad():
            for name, value in (("weight", w), ("bias", b), ("mean", mean), ("std", std)):
                getattr(self, name).copy_(torch.from_numpy(np.asarray(value)).float())
        self.fit_info = {"C": best, "val_auroc_by_C": {str(c): r[2] for c, r in results.items()}}
        return dict(self.fit_info)

    def _resize(self, dim: int) -> None:
        for name, shape in (("weight", (len(self.labels), dim)), ("mean", (dim,)), ("std", (dim,))):
            setattr(self, name, torch.zeros(shape) if name != "std" else torch.ones(shape))

    def scores_cached(self, cache: Any, rows: np.ndarray, device: str = "cpu") -> np.ndarray:
        with torch.no_grad():
            return torch.sigmoid(self(self.features_cached(cache, rows).to(self.weight.device))).cpu().numpy()

    def scores_views(self, pixels: list[Tensor]) -> tuple[np.ndarray, dict]:
        feats = probe_features(frozen_embeddings(self.backbones, pixels), self.options.features,
                               self.focal.include_whole)
        with torch.no_grad():
            return torch.sigmoid(self(feats.to(self.weight.device)).float()).cpu().numpy(), {}

    def logits_from_tokens(self, tokens: list[Tensor], layers: list[int], b: int, n: int) -> Tensor:
        frozen = [bb.vision.finalize(bb.vision.run_blocks(x, start)).view(b, n, -1)
                  for bb, x, start in zip(self.backbones, tokens, layers)]
        return self(probe_features(frozen, self.options.features, self.focal.include_whole))

    def trainable_parameters(self) -> dict:
        return {}

    def state_tensors(self) -> dict[str, Tensor]:
        return {"weight": self.weight, "bias": self.bias, "mean": self.mean, "std": self.std}

    def load_state_tensors(self, tensors: dict[str, Tensor], source: str = "weights") -> None:
        w = tensors.get("weight")
        if w is not None and w.ndim == 2 and w.shape[0] == len(self.labels) and w.shape[1] != self.weight.shape[1]:
            self._resize(w.shape[1])
        super().load_state_tensors(tensors, source)
        self.source = source

    def num_trainable(self) -> int:
        return int(self.weight.numel() + self.bias.numel())

    def info(self) -> dict:
        return dict(self.fit_info)

    def restore_info(self, info: dict) -> None:
        self.fit_info = dict(info)
