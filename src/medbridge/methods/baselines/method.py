"""The feature-space baselines behind the method interface: one wrapper for every :class:`FeatureMethod`, with an
options dataclass made from the baseline's optimisation settings and its constructor's keyword arguments."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ...backbones.base import Backbone, backbone_fingerprint
from ...data.focal import FocalConfig
from ..api import CacheSpec, ClosedFormFit, Explainable, Method, Optimization, TrainingData, parse_options
from ..frozen_features import embedding_cache_spec
from .base import FeatureMethod, Hparams, PrefixCaching

HPARAM_HELP = {"optimizer": "sgd (momentum 0.9) or adamw", "lr": "learning rate", "weight_decay": "weight decay",
               "epochs": "epochs", "batch_size": "mini-batch size",
               "warmup_epochs": "epochs at lr 1e-5 before the cosine schedule (Dassl)",
               "extra": "method-specific settings (e.g. LP++'s alpha_every)"}


def baseline_options_class(feature_class: type[FeatureMethod]) -> type:
    """An options dataclass for a baseline: its :class:`Hparams` (None = the method's published default) plus the
    keyword arguments of its constructor, typed and defaulted from the signature."""
    specs = []
    defaults = feature_class.default_hparams
    for f in dataclasses.fields(Hparams):  # defaulting to the method's published settings (specs/baselines.md)
        value = getattr(defaults, f.name)
        default = (dataclasses.field(default_factory=lambda v=value: dict(v)) if isinstance(value, dict)
                   else dataclasses.field(default=value))
        default.metadata = {"help": HPARAM_HELP.get(f.name, "")}
        specs.append((f.name, f.type, default))
    seen = {s[0] for s in specs}
    for cls in feature_class.__mro__:  # the constructor's keywords, following **kwargs to the parent's
        if "__init__" not in vars(cls):
            continue
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        for p in params:
            if p.name in ("backbone", "labels", "names") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if p.name not in seen and p.default is not inspect.Parameter.empty:
                seen.add(p.name)
                kind = p.annotation if isinstance(p.annotation, str) and p.annotation != "_empty" else "Any"
                specs.append((p.name, kind, dataclasses.field(default=p.default, metadata={"help": "see the "
                              f"{feature_class.__name__} docstring"})))
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    if "template" not in seen:
        from ..prompts import DEFAULT_TEMPLATE

        specs.append(("template", "str", dataclasses.field(default=DEFAULT_TEMPLATE, metadata={"help": "prompt"})))
    # __post_init__ in the namespace: the generated __init__ only calls one that exists when the class is made
    return dataclasses.make_dataclass(f"{feature_class.__name__}Options", specs,
                                      namespace={"__post_init__": _check_hparams})


# constructor options that are counts or scales: > 0 (every other number option: >= 0)
_POSITIVE = ("lr", "epochs", "batch_size", "n_ctx", "reduction", "hidden", "num_tokens", "rep_dim", "temperature")


def _check_hparams(self) -> None:
    """Ranges of a baseline's options (types are checked before, from the field annotations)."""
    if self.optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer: {self.optimizer!r} is not one of sgd, adamw")
    for f in dataclasses.fields(self):
        value = getattr(self, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if f.name in _POSITIVE and not value > 0:
            raise ValueError(f"{f.name} must be > 0, got {value}")
        if not value >= 0:
            raise ValueError(f"{f.name} must be >= 0, got {value}")


def prefix_cache_spec(backbone: Backbone, blocks: int) -> CacheSpec:
    """The vision tokens after the first ``blocks`` frozen blocks of the whole image (MMA, MMRL)."""
    focal = FocalConfig(num_crops=0)
    v = backbone.vision
    size = v.preprocess.image_size
    dev = next(v.parameters()).device
    with torch.no_grad():
        n_tokens = v.run_blocks(v.embed(torch.zeros(1, 3, size, size, device=dev)), 0, blocks).shape[1]

    def compute(pixels: list[Tensor]) -> dict[str, Tensor]:
        px = pixels[0]
        out = v.run_blocks(v.embed(px.flatten(0, 1)), 0, blocks)
        return {"e0.prefix": out.view(px.shape[0], px.shape[1], *out.shape[1:])}

    parts = {"what": f"vision-prefix-{blocks}", "backbones": [backbone_fingerprint(backbone)],
             "focal": focal.to_dict(), "preprocess": [v.preprocess.to_dict()]}
    return CacheSpec(parts, {"e0.prefix": (1, n_tokens, v.width)}, compute, focal, [v.preprocess])


class BaselineMethod(Explainable, ClosedFormFit, Method):
    """A feature-space baseline: the whole image at the backbone's input size, its frozen pooled embedding (or
    the tokens after the first blocks for MMA/MMRL) -> the baseline's logits."""

    feature_class: type[FeatureMethod] = FeatureMethod

    def __init__(self, options: Any, backbones: list[Backbone], labels: list[str], prompt_names: list[str],
                 focal: FocalConfig) -> None:
        super().__init__(options, backbones[:1], labels, prompt_names, FocalConfig(num_crops=0))
        kwargs = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
                  if f.name not in {h.name for h in dataclasses.fields(Hparams)}}
        self.method = self.feature_class(backbones[0], list(labels), list(prompt_names), **kwargs)
        self.fit_info: dict = {}

    @classmethod
    def check_options(cls, options: dict | None, where: str = "options") -> Any:
        return parse_options(cls.options_class, options, where)

    @property
    def prefix_blocks(self) -> int | None:
        """Frozen blocks before the cached tokens (:class:`PrefixCaching` baselines), None: the pooled embedding."""
        return self.method.cache_prefix_blocks if isinstance(self.method, PrefixCaching) else None

    @property
    def hparams(self) -> Hparams:
        return Hparams(**{f.name: getattr(self.options, f.name) for f in dataclasses.fields(Hparams)})

    # -- cache
    def cache_spec(self, n_views: int) -> CacheSpec:
        blocks = self.prefix_blocks
        if blocks is None:
            return embedding_cache_spec([self.method.backbone], self.focal, 1)
        return prefix_cache_spec(self.method.backbone, blocks)

    def features_cached(self, cache: Any, rows: np.ndarray) -> Tensor:
        name = "e0.frozen" if self.prefix_blocks is None else "e0.prefix"
        return cache.read(rows, [name])[name][:, 0].float()

    def _device(self) -> torch.device:
        return next(self.method.backbone.parameters()).device

    # -- fitting
    def prepare(self, data: TrainingData) -> None:
        self.method.init_from_features(self.features_cached(data.cache, data.train_rows).to(self._device()))

    def fit_closed_form(self, data: TrainingData) -> dict | None:
        if not self.trainable_parameters():
            self.fit_info = {"epochs": 0}
            return self.fit_info
        dev = self._device()
        y = torch.from_numpy(data.targets).to(dev)
        has_val = len(data.val_rows) > 0
        info = self.method.fit_features(
            self.features_cached(data.cache, data.train_rows).to(dev), y[data.train_rows],
            self.features_cached(data.cache, data.val_rows).to(dev) if has_val else None,
            y[data.val_rows] if has_val else None, self.hparams)
        if info is not None:
            self.fit_info = info
        return info

    def optimization(self, defaults: Optimization) -> Optimization:
        hp = self.hparams
        return Optimization(optimizer=hp.optimizer, lr=hp.lr, weight_decay=hp.weight_decay, epochs=hp.epochs,
                            batch_size=hp.batch_size, schedule="warmup-cosine", warmup_epochs=hp.warmup_epochs)

    def read_batch(self, cache: Any, rows: np.ndarray, device: str) -> Tensor:
        return self.features_cached(cache, rows).to(device)

    def training_loss(self, batch: Tensor, targets: Tensor, reports: list | None) -> Tensor:
        return self.method.training_loss(batch, targets)

    def training_step(self, batch: Tensor, targets: Tensor, reports: list | None, optimizer: torch.optim.Optimizer,
                      reduce_gradients: Callable[[list[nn.Parameter]], None],
                      autocast: Callable[[], AbstractContextManager]) -> Tensor:
        with autocast():
            return self.method.train_step(batch, targets, optimizer, reduce_gradients)

    # -- scoring
    def scores_cached(self, cache: Any, rows: np.ndarray, device: str = "cpu") -> np.ndarray:
        with torch.no_grad():
            return torch.sigmoid(self.method(self.features_cached(cache, rows).to(self._device()))).cpu().numpy()

    def scores_views(self, pixels: list[Tensor]) -> tuple[np.ndarray, dict]:
        """From the whole-image view [B, 1, 3, S, S] directly (what the cache stores, without building its spec and
        its shape probe for every batch)."""
        v = self.method.backbone.vision
        blocks = self.prefix_blocks
        with torch.no_grad():
            x = v.run_blocks(v.embed(pixels[0][:, 0]), 0, blocks)
            return torch.sigmoid(self.method(x if blocks is not None else v.finalize(x)).float()).cpu().numpy(), {}

    # -- explanations
    def explain_top_block(self, expert: int) -> int:
        blocks = self.prefix_blocks
        return self.method.backbone.vision.depth - 1 if blocks is None else blocks

    def logits_from_tokens(self, tokens: list[Tensor], layers: list[int], b: int, n: int) -> Tensor:
        v, x, start = self.method.backbone.vision, tokens[0], layers[0]
        blocks = self.prefix_blocks
        return self.method(v.finalize(v.run_blocks(x, start)) if blocks is None else v.run_blocks(x, start, blocks))

    # -- saved
    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return self.method.trainable_parameters()

    def state_tensors(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.method.state_dict(keep_vars=True).items()
                if not k.startswith(("backbone.", "prompt.text."))}

    def info(self) -> dict:
        return {"fit": self.fit_info, "hparams": dataclasses.asdict(self.hparams)}

    def restore_info(self, info: dict) -> None:
        self.fit_info = dict(info.get("fit", {}))


def baseline_method_class(feature_class: type[FeatureMethod]) -> type[BaselineMethod]:
    """The method class registered for one baseline."""
    doc = (feature_class.__doc__ or feature_class.__name__).strip().splitlines()[0]
    return type(f"{feature_class.__name__}Method", (BaselineMethod,), {
        "feature_class": feature_class, "name": feature_class.name, "__doc__": doc, "__module__": __name__,
        "seed_dependent": feature_class.seed_dependent})
