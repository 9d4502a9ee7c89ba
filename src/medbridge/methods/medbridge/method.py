"""MedBridge behind the method interface: cache spec (the frozen path), the training step on cached activations,
scoring from the cache or from views, and the saved tensors (the adapter)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...backbones.base import Backbone, backbone_fingerprint
from ...data.focal import FocalConfig
from ..api import (
    CacheSpec,
    Explainable,
    Method,
    NotApplicableError,
    OptionsError,
    TextPrompted,
    TrainingData,
    parse_options,
)
from ..prompts import DEFAULT_TEMPLATE
from .model import MedBridgeConfig, MedBridgeModel


@dataclass
class MedBridgeOptions:
    """MedBridge's options: every :class:`MedBridgeConfig` field except those the run supplies (labels, prompt
    names, backbones and focal views). Defaults and meanings: ``MedBridgeConfig``."""

    text_source: int | str = field(default=0, metadata={"help": "expert whose text tower encodes the prompts, or a "
                                                                "text-tower source"})
    template: str = field(default=DEFAULT_TEMPLATE, metadata={"help": "prompt template ({} = name)"})
    t1: int | None = field(default=None, metadata={"help": "queries enter after block t1 (default depth // 2)"})
    num_queries: int = field(default=8, metadata={"help": "Q learnable query tokens per expert"})
    attention: str = field(default="isolated", metadata={"help": "joint (paper) or isolated (frozen path kept)"})
    frozen_weight: float = field(default=0.5, metadata={"help": "alpha: weight of the frozen class token"})
    view_attention: bool = field(default=True, metadata={"help": "self-attention across views before pooling"})
    view_heads: int = field(default=4, metadata={"help": "heads of the view self-attention"})
    view_dim: int | None = field(default=None, metadata={"help": "width of the view self-attention (null or >= "
                                                                 "the tower's: the tower's; smaller: a bottleneck)"})
    logits: str = field(default="scaled", metadata={"help": "cosine (paper-literal) or scaled"})
    feature_norm: str = field(default="auto", metadata={"help": "standardize, none, or auto (unless aligned)"})
    init_scale: float = field(default=10.0, metadata={"help": "initial temperature of scaled logits"})
    report_weight: float = field(default=0.0, metadata={"help": "weight of the report-text loss (0 = off)"})
    case_views: bool = field(default=True, metadata={"help": "cases: pool all images' views (else mean of the "
                                                             "images' logits)"})


RUN_SUPPLIED = ("labels", "prompt_names", "backbones", "focal")
assert {f.name for f in fields(MedBridgeOptions)} == {f.name for f in fields(MedBridgeConfig)} - set(RUN_SUPPLIED)


def split_cached(values: dict[str, Tensor], n_experts: int, device) -> list[dict[str, Tensor]]:
    """Flat cache entries {"e0.states": ...} -> per-expert dicts on ``device``."""
    out = [{} for _ in range(n_experts)]
    for name, t in values.items():
        k, key = name.split(".", 1)
        out[int(k[1:])][key] = t.to(device, non_blocking=True)
    return out


def predict_cached(model: MedBridgeModel, cache: Any, rows: np.ndarray, batch_size: int = 32, device: str = "cpu",
                   labels: list[str] | None = None, prompt_names: list[str] | None = None,
                   with_details: bool = False):
    """Sigmoid scores [len(rows), L] (+ gates and view votes with ``with_details``) from the cache."""
    model.eval()
    scores, gates, votes = [], [], []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            cached = split_cached(cache.read(rows[i:i + batch_size]), len(model.encoders), device)
            out = model.forward_cached(cached, labels, prompt_names)
            scores.append(torch.sigmoid(out.logits.float()).cpu())
            gates.append(out.gate.float().cpu())
            votes.append(out.view_votes.float().cpu())
    s = torch.cat(scores).numpy() if scores else np.zeros((0, len(labels or model.config.labels)))
    if with_details:
        return s, torch.cat(gates).numpy(), torch.cat(votes).numpy()
    return s


def fit_feature_norms(model: MedBridgeModel, cache: Any, train_rows: np.ndarray) -> None:
    """Standardisation statistics from the training rows' cached frozen embeddings (every view)."""
    if not model.standardized:
        return
    names = [f"e{k}.frozen" for k in range(len(model.encoders))]
    if not all(n in getattr(cache, "arrays", {}) for n in names):  # prefix-only caches: run the frozen path
        names = None
    frozen = [[] for _ in model.encoders]
    with torch.no_grad():
        for i in range(0, len(train_rows), 256):
            cached = split_cached(cache.read(train_rows[i:i + 256], names), len(model.encoders), "cpu")
            for k, (enc, item) in enumerate(zip(model.encoders, cached)):
                if "frozen" in item:
                    frozen[k].append(item["frozen"].float())
                else:
                    b, n = item["prefix"].shape[:2]
                    weight = next(enc.vision.parameters())
                    out = enc.frozen_embedding(item["prefix"].flatten(0, 1).to(weight.device, weight.dtype))
                    frozen[k].append(out.view(b, n, -1).cpu().float())
    model.fit_feature_norms([torch.cat(f) for f in frozen])


def _new_model(options: MedBridgeOptions, backbones: list[Backbone], labels: list[str], prompt_names: list[str],
               focal: FocalConfig) -> MedBridgeModel:
    """A new, untrained model from the options and what the run supplies."""
    from ...backbones import create_text_tower

    config = MedBridgeConfig(labels=list(labels), prompt_names=list(prompt_names),
                             backbones=[b.name for b in backbones], focal=focal, **vars(options))
    text = None if isinstance(config.text_source, int) else create_text_tower(config.text_source)
    return MedBridgeModel(config, backbones, text)


def medbridge_cache_values(model: MedBridgeModel, pixels: list[Tensor]) -> dict[str, Tensor]:
    return {f"e{k}.{name}": t for k, item in enumerate(model.cacheable(pixels)) for name, t in item.items()}


class MedBridgeMethod(TextPrompted, Explainable, Method):
    """MedBridge (Li, Ghahremani, Wachinger 2025): query tokens in frozen ViTs, view pooling, MoE, text head."""

    name = "medbridge"
    case_views = True  # a case's views (all its images') pool through the view attention (paper Sec. 3.2);
    # the option case_views=False sets the engine's image-by-image rule on the instance

    def __init__(self, options: MedBridgeOptions, backbones: list[Backbone] | None = None,
                 labels: list[str] | None = None, prompt_names: list[str] | None = None,
                 focal: FocalConfig | None = None, *, model: MedBridgeModel | None = None) -> None:
        """The base signature (every argument needed unless ``model`` is given); ``model``: an existing model to
        wrap (its config gives the options, and ``labels`` / ``prompt_names`` other than its own are scored through
        the prompts: ``eval --label-space data``)."""
        if isinstance(options, MedBridgeModel):  # medbridge 0.1: MedBridgeMethod(model)
            warnings.warn("MedBridgeMethod(model) is deprecated: use MedBridgeMethod.from_model(model)",
                          DeprecationWarning, stacklevel=2)
            model, options = options, None
        if model is None:
            if backbones is None or labels is None or prompt_names is None or focal is None:
                raise TypeError("MedBridgeMethod needs options, backbones, labels, prompt_names and focal, or model=")
            model = _new_model(options, backbones, labels, prompt_names, focal)
        cfg = model.config
        options = MedBridgeOptions(**{f.name: getattr(cfg, f.name) for f in fields(MedBridgeOptions)})
        super().__init__(options, list(model.backbones), list(cfg.labels), list(cfg.names), cfg.focal)
        self.model = model
        self.case_views = bool(cfg.case_views)
        # another label list scored through the prompts (eval --label-space data); None: the trained labels
        self.score_labels: list[str] | None = None
        self.score_prompt_names: list[str] | None = None
        if labels is not None and (list(labels) != list(cfg.labels) or list(prompt_names or []) != list(cfg.names)):
            self.score_labels, self.score_prompt_names = list(labels), list(prompt_names or [])
            self.labels = list(labels)

    @classmethod
    def from_model(cls, model: MedBridgeModel) -> MedBridgeMethod:
        """The method around an existing :class:`MedBridgeModel` (options, labels and views from its config)."""
        return cls(None, model=model)  # type: ignore[arg-type]

    @classmethod
    def check_options(cls, options: dict | None, where: str = "options") -> MedBridgeOptions:
        opts = parse_options(MedBridgeOptions, options, where)
        try:
            MedBridgeConfig(labels=["x"], **vars(opts))
        except (ValueError, TypeError) as exc:
            raise OptionsError(f"{where}: {exc}") from exc
        return opts

    def with_label_names(self, labels: list[str], prompt_names: list[str]) -> MedBridgeMethod:
        return MedBridgeMethod(self.options, self.backbones, list(labels), list(prompt_names), self.focal,
                               model=self.model)

    # -- cache
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
        parts = {"what": "medbridge-frozen", "backbones": [backbone_fingerprint(b) for b in self.backbones],
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

    # -- fitting through the shared loop
    def prepare(self, data: TrainingData) -> None:
        fit_feature_norms(self.model, data.cache, np.asarray(data.train_rows))

    def read_batch(self, cache: Any, rows: np.ndarray, device: str) -> list[dict[str, Tensor]]:
        return split_cached(cache.read(rows), len(self.model.encoders), device)

    def training_loss(self, batch: list[dict[str, Tensor]], targets: Tensor, reports: list | None) -> Tensor:
        out = self.model.forward_cached(batch)
        return self.model.loss(out, targets, reports=reports if self.model.config.report_weight > 0 else None)

    # -- scoring
    def scores_cached(self, cache: Any, rows: np.ndarray, device: str = "cpu") -> np.ndarray:
        return predict_cached(self.model.to(device), cache, rows, device=device, labels=self.score_labels,
                              prompt_names=self.score_prompt_names)

    def scores_views(self, pixels: list[Tensor]) -> tuple[np.ndarray, dict]:
        with torch.no_grad():
            out = self.model(pixels, self.score_labels, self.score_prompt_names)
        return torch.sigmoid(out.logits.float()).cpu().numpy(), {"gate": out.gate.float().cpu().numpy(),
                                                              "view_votes": out.view_votes.float().cpu().numpy()}

    # -- explanations
    def explain_top_block(self, expert: int) -> int:
        return self.model.encoders[expert].t1

    def logits_from_tokens(self, tokens: list[Tensor], layers: list[int], b: int, n: int) -> Tensor:
        cached = []
        for enc, x, start in zip(self.model.encoders, tokens, layers):
            v = enc.vision
            prefix = v.run_blocks(x, start, enc.t1)
            if enc.attention == "joint":
                if enc.num_queries == 0:
                    raise NotApplicableError("no gradient path to explain: joint attention with num_queries=0")
                cached.append({"prefix": prefix.view(b, n, *prefix.shape[1:])})
                continue
            states = []
            for block in list(v.blocks)[enc.t1:]:  # the isolated frozen path (QEncoder.frozen_states), with grad
                states.append(prefix)
                prefix = block(prefix)
            states = torch.stack(states, 1)
            cached.append({"states": states.view(b, n, *states.shape[1:]),
                           "frozen": v.finalize(prefix).view(b, n, -1)})
        return self.model.forward_cached(cached, self.score_labels, self.score_prompt_names).logits

    # -- saved
    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return self.model.trainable_parameters()

    def state_tensors(self) -> dict[str, Tensor]:
        return self.model.adapter_tensors()

    def info(self) -> dict:
        return {"text_projection_init": self.model.text_head.init, "parameters": self.model.parameter_report()}
