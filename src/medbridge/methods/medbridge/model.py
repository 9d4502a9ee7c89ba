"""The MedBridge model: focal views -> QEncoder per expert -> view pooling -> mixture of experts -> text head."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from ...backbones.base import Backbone, TextTower
from ...data.focal import FocalConfig, FocalViews, focal_views
from ..heads import CosineLogits, masked_bce
from ..prompts import DEFAULT_TEMPLATE, prompt_name
from .moe import ExpertMixture
from .pooling import ViewPooling
from .qencoder import QEncoder
from .text_head import LabelTextHead

FEATURE_NORMS = ("auto", "standardize", "none")


class FeatureStandardizer(nn.Module):
    """(x - mean) / std per embedding dimension, with statistics of the training set's frozen embeddings
    (buffers saved with the adapter; identity until :meth:`fit`). Frozen embeddings of one image domain share a
    large common component (DINOv2 CLS on X-rays: 91% of the squared norm) that would otherwise dominate the
    cosine head; the linear probe standardises the same way."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, embeddings: Tensor) -> None:
        """embeddings [n, dim] (n >= 2) -> set mean/std (std floored at 1e-6)."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.mean.shape[0] or embeddings.shape[0] < 2:
            raise ValueError(f"expected [n >= 2, {self.mean.shape[0]}] embeddings, got {tuple(embeddings.shape)}")
        e = embeddings.double()
        self.mean.copy_(e.mean(0).to(self.mean))
        self.std.copy_(e.std(0).clamp_min(1e-6).to(self.std))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


@dataclass
class MedBridgeConfig:
    """MedBridge hyperparameters. Fields marked (abl.) were studied on the NIH sample: docs/ablations.md."""

    labels: list[str]  # label names as the dataset spells them
    prompt_names: list[str] | None = None  # readable names for prompts, aligned with labels (default: derived)
    backbones: list[str] = field(default_factory=lambda: ["dinov2-small+minilm-l6"])  # expert sources
    text_source: int | str = 0  # index of the expert whose text tower encodes prompts, or a text-tower source
    template: str = DEFAULT_TEMPLATE  # prompt template with {} for the class name
    t1: int | None = None  # queries enter after block t1 (default depth // 2) (abl.)
    num_queries: int = 8  # Q learnable queries per expert (abl.)
    attention: str = "isolated"  # "joint" (paper) or "isolated" (frozen path = pretrained model) (abl.)
    frozen_weight: float = 0.5  # paper's alpha (Eq. 2): weight of the FROZEN class token; 1 - it on queries (abl.)
    view_attention: bool = True  # self-attention across views before max-pooling
    view_heads: int = 4
    # width of the view self-attention: None = the tower's (4 D^2 parameters per pool); w < D runs it in a
    # w-wide bottleneck (down D->w, attention, up w->D zero-initialised; 2 D w + 4 w^2); w >= D: the tower's
    # width; heads: the largest divisor of the width <= view_heads (abl.)
    view_dim: int | None = None
    logits: str = "scaled"  # "cosine" (paper-literal) or "scaled" (learnable temperature + per-class bias)
    # "standardize" frozen/query tokens with training-set statistics, "none" (paper), or "auto": standardize
    # unless the text tower is aligned with its image tower (a CLIP's zero-shot start is kept) (abl.)
    feature_norm: str = "auto"
    init_scale: float = 10.0  # initial temperature for "scaled" logits
    report_weight: float = 0.0  # lambda_report: weight of the report-text BCE (0 = off)
    # under data.unit: case, a case's views (all its images') pool through the view attention (paper Sec. 3.2);
    # False: each image is scored alone and a case is the mean of its images' logits (the engine's default rule)
    case_views: bool = True
    focal: FocalConfig = field(default_factory=FocalConfig)

    def __post_init__(self) -> None:
        if isinstance(self.focal, dict):
            self.focal = FocalConfig(**self.focal)
        if not self.labels:
            raise ValueError("labels: the label list is empty")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels: duplicated names in {self.labels}")
        if self.prompt_names is not None:
            if len(self.prompt_names) != len(self.labels):
                raise ValueError(f"prompt_names: {len(self.prompt_names)} names for {len(self.labels)} labels")
            empty = [lab for lab, p in zip(self.labels, self.prompt_names) if not str(p).strip()]
            if empty:
                raise ValueError(f"prompt_names: no prompt name for labels {empty}")
        if not self.backbones:
            raise ValueError("backbones: at least one expert is needed")
        if self.num_queries < 0:
            raise ValueError(f"num_queries must be >= 0, got {self.num_queries}")
        if not 0.0 <= self.frozen_weight <= 1.0:
            raise ValueError(f"frozen_weight (alpha) must lie in [0, 1], got {self.frozen_weight}")
        if self.num_queries == 0 and self.frozen_weight < 1.0:
            raise ValueError("num_queries=0 leaves no query path: set frozen_weight=1.0")
        if self.attention not in ("joint", "isolated"):
            raise ValueError(f"attention must be 'joint' or 'isolated', got {self.attention!r}")
        if self.feature_norm not in FEATURE_NORMS:
            raise ValueError(f"feature_norm must be one of {FEATURE_NORMS}, got {self.feature_norm!r}")
        if self.logits not in ("cosine", "scaled"):
            raise ValueError(f"logits must be 'cosine' or 'scaled', got {self.logits!r}")
        if self.report_weight < 0:
            raise ValueError(f"report_weight must be >= 0, got {self.report_weight}")
        if self.view_dim is not None and (isinstance(self.view_dim, bool) or not isinstance(self.view_dim, int)
                                          or self.view_dim < 1):
            raise ValueError(f"view_dim must be a positive whole number or null, got {self.view_dim!r}")
        if self.view_dim is not None and not self.view_attention:
            raise ValueError("view_dim sets the width of the view self-attention: it needs view_attention=true")
        if not isinstance(self.case_views, bool):
            raise ValueError(f"case_views must be true or false, got {self.case_views!r}")

    @property
    def names(self) -> list[str]:
        return self.prompt_names or [prompt_name(lab) for lab in self.labels]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["focal"] = self.focal.to_dict()
        return d


@dataclass
class MedBridgeOutput:
    logits: Tensor  # [B, L]
    image_embedding: Tensor  # v [B, f]
    gate: Tensor  # [B, K] expert weights per image
    view_votes: Tensor  # [B, K, N]: share of embedding dimensions whose max came from each view (explanation)
    label_embedding: Tensor  # [L, f]


class MedBridgeModel(nn.Module):
    """MedBridge on K >= 1 frozen backbones. Only the adapter (queries, view pooling, MoE maps/gate, text
    projection, logit scale/bias) is trainable."""

    def __init__(self, config: MedBridgeConfig, backbones: list[Backbone], text: TextTower | None = None) -> None:
        super().__init__()
        if len(backbones) != len(config.backbones):
            raise ValueError(f"config names {len(config.backbones)} backbones, {len(backbones)} given")
        self.config = config
        self.backbones = nn.ModuleList(backbones)
        for b in backbones:
            b.freeze()
        if text is None:
            if not isinstance(config.text_source, int) or not 0 <= config.text_source < len(backbones):
                raise ValueError(f"text_source {config.text_source!r}: pass a text tower or an expert index")
            text = backbones[config.text_source].text
            if text is None:
                raise ValueError(f"expert {config.text_source} ({backbones[config.text_source].name}) has no text "
                                 "tower: choose a text-capable expert or a separate text tower (e.g. minilm-l6)")
        aligned = isinstance(config.text_source, int) and bool(backbones[config.text_source].aligned)
        self.standardized = config.feature_norm == "standardize" or (config.feature_norm == "auto" and not aligned)
        self.encoders = nn.ModuleList()
        self.feature_norms = nn.ModuleList()
        self.frozen_pool = nn.ModuleList()
        self.query_pool = nn.ModuleList()
        for b in backbones:
            v = b.vision
            t1 = v.depth // 2 if config.t1 is None else config.t1
            self.encoders.append(QEncoder(v, t1, config.num_queries, config.attention))
            self.feature_norms.append(FeatureStandardizer(v.embed_dim) if self.standardized else nn.Identity())
            pool = dict(heads=config.view_heads, attention=config.view_attention, width=config.view_dim)
            self.frozen_pool.append(ViewPooling(v.embed_dim, **pool))
            self.query_pool.append(ViewPooling(v.embed_dim, **pool) if config.num_queries > 0 else nn.Identity())
        dims = [b.vision.embed_dim for b in backbones]
        text_expert = config.text_source if isinstance(config.text_source, int) else 0
        self.embed_dim = dims[text_expert] if text_expert < len(dims) else dims[0]
        self.mixture = ExpertMixture(dims, self.embed_dim)
        self.text_head = LabelTextHead(text, self.embed_dim, config.template)
        self.head = CosineLogits(config.labels, config.logits, config.init_scale)
        for p in text.parameters():  # a separately given text tower is frozen too (backbones froze above)
            p.requires_grad_(False)

    # ------------------------------------------------------------------ views
    @property
    def preprocess(self):
        return [b.vision.preprocess for b in self.backbones]

    def views(self, image: np.ndarray, train: bool = False, rng: np.random.Generator | None = None) -> list[FocalViews]:
        """Focal views of one full-resolution image, one :class:`FocalViews` per expert (same boxes)."""
        return focal_views(image, self.config.focal, self.preprocess, train=train, rng=rng)

    # ------------------------------------------------------------------ forward
    def prefix_tokens(self, pixels: list[Tensor]) -> list[Tensor]:
        """The cacheable intermediate: per expert, output of block T1 for every view, [B, N, L, width]."""
        out = []
        for enc, px in zip(self.encoders, self._as_list(pixels)):
            b, n = px.shape[:2]
            tokens = enc.prefix(px.flatten(0, 1))
            out.append(tokens.view(b, n, *tokens.shape[1:]))
        return out

    def _as_list(self, pixels: Tensor | list[Tensor]) -> list[Tensor]:
        pixels = [pixels] if isinstance(pixels, Tensor) else list(pixels)
        if len(pixels) != len(self.encoders):
            raise ValueError(f"expected views for {len(self.encoders)} experts, got {len(pixels)}")
        for k, px in enumerate(pixels):
            size = self.backbones[k].vision.preprocess.image_size
            if px.ndim != 5 or px.shape[2] != 3 or px.shape[-2:] != (size, size):
                raise ValueError(f"expert {k}: expected views [B, N, 3, {size}, {size}], got {tuple(px.shape)}")
        return pixels

    def forward(self, pixels: Tensor | list[Tensor], labels: list[str] | None = None,
                prompt_names: list[str] | None = None) -> MedBridgeOutput:
        """Views [B, N, 3, S, S] (one tensor per expert) -> logits for ``labels`` (default: the trained ones)."""
        return self.forward_from_prefix(self.prefix_tokens(pixels), labels, prompt_names)

    def forward_from_prefix(self, prefixes: list[Tensor], labels: list[str] | None = None,
                            prompt_names: list[str] | None = None) -> MedBridgeOutput:
        encoded = []
        for enc, prefix in zip(self.encoders, prefixes):
            b, n = prefix.shape[:2]
            frozen, queries = enc.forward_from_prefix(prefix.flatten(0, 1))
            encoded.append((frozen.view(b, n, -1), queries))
        return self._head(encoded, labels, prompt_names)

    # ------------------------------------------------------------------ cache
    def cacheable(self, pixels: Tensor | list[Tensor]) -> list[dict[str, Tensor]]:
        """Everything of the forward pass that no trainable parameter touches, per expert: the prefix
        {"prefix": [B, N, L, width]} (joint attention) or, in isolated mode, the frozen path's block inputs and
        pooled output {"states": [B, N, T-T1, L, width], "frozen": [B, N, E]}. :meth:`forward_cached` continues
        from it exactly."""
        out = []
        for enc, prefix in zip(self.encoders, self.prefix_tokens(pixels)):
            b, n = prefix.shape[:2]
            if enc.attention == "joint":
                out.append({"prefix": prefix})
                continue
            states, frozen = enc.frozen_states(prefix.flatten(0, 1))
            out.append({"states": states.view(b, n, *states.shape[1:]), "frozen": frozen.view(b, n, -1)})
        return out

    def forward_cached(self, cached: list[dict[str, Tensor]], labels: list[str] | None = None,
                       prompt_names: list[str] | None = None) -> MedBridgeOutput:
        if len(cached) != len(self.encoders):
            raise ValueError(f"expected cached tensors for {len(self.encoders)} experts, got {len(cached)}")
        encoded = []
        for enc, item in zip(self.encoders, cached):
            if "prefix" in item:
                b, n = item["prefix"].shape[:2]
                frozen, queries = enc.forward_from_prefix(item["prefix"].flatten(0, 1).float())
                encoded.append((frozen.view(b, n, -1), queries))
            else:
                b, n = item["frozen"].shape[:2]
                frozen, queries = enc.forward_from_states(item["states"].flatten(0, 1).float(),
                                                          item["frozen"].flatten(0, 1).float())
                encoded.append((frozen.view(b, n, -1), queries))
        return self._head(encoded, labels, prompt_names)

    def _head(self, encoded: list[tuple[Tensor, Tensor]], labels: list[str] | None,
              prompt_names: list[str] | None) -> MedBridgeOutput:
        """Per expert (pooled frozen tokens [B, N, E], queries [B*N, Q, E]) -> view pooling -> MoE -> logits."""
        alpha = self.config.frozen_weight
        class_tokens, gate_inputs, votes = [], [], []
        for k, (enc, (frozen, queries)) in enumerate(zip(self.encoders, encoded)):
            b, n = frozen.shape[:2]
            frozen, queries = self.feature_norms[k](frozen), self.feature_norms[k](queries)
            m_bar, m_idx = self.frozen_pool[k](frozen)
            vote = torch.stack([(m_idx == i).float().mean(-1) for i in range(n)], dim=-1)
            if self.config.num_queries > 0:
                q_bar, q_idx = self.query_pool[k](queries.reshape(b, n * enc.num_queries, -1))
                q_view = torch.div(q_idx, enc.num_queries, rounding_mode="floor")
                vote = alpha * vote + (1 - alpha) * torch.stack([(q_view == i).float().mean(-1) for i in range(n)], -1)
                a = alpha * m_bar + (1 - alpha) * q_bar
                gate_inputs.append(q_bar)
            else:
                a = m_bar
                gate_inputs.append(m_bar)
            class_tokens.append(a)
            votes.append(vote)
        v, g = self.mixture(class_tokens, gate_inputs)
        labels = labels or self.config.labels
        if prompt_names is None:
            prompt_names = self.config.names if labels == self.config.labels else [prompt_name(x) for x in labels]
        z = self.text_head(prompt_names)
        logits = self.head(v, z, labels)
        n_max = max(x.shape[-1] for x in votes)
        votes = torch.stack([nn.functional.pad(x, (0, n_max - x.shape[-1])) for x in votes], dim=1)
        return MedBridgeOutput(logits, v, g, votes, z)

    # ------------------------------------------------------------------ loss
    def loss(self, out: MedBridgeOutput, targets: Tensor, mask: Tensor | None = None,
             reports: list[str | None] | None = None) -> Tensor:
        """Masked multi-label BCE (+ report_weight * BCE between report embeddings and the labels)."""
        loss = masked_bce(out.logits, targets, mask)
        if self.config.report_weight > 0 and reports is not None:
            idx = [i for i, r in enumerate(reports) if r]
            if idx:
                r = self.text_head.encode_uncached([reports[i] for i in idx])
                r_logits = self.head(r, out.label_embedding)
                sub_mask = None if mask is None else mask[idx]
                loss = loss + self.config.report_weight * masked_bce(r_logits, targets[idx], sub_mask)
        return loss

    # ------------------------------------------------------------------ bookkeeping
    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def adapter_tensors(self) -> dict[str, Tensor]:
        """What an adapter file holds: the trainable parameters plus the feature statistics."""
        stats = {f"feature_norms.{n}": t for n, t in self.feature_norms.named_buffers()}
        return {**self.trainable_parameters(), **stats}

    def fit_feature_norms(self, frozen: list[Tensor]) -> None:
        """Per expert, the training set's frozen pooled embeddings [n, (N,) E] (every view) -> statistics."""
        if len(frozen) != len(self.feature_norms):
            raise ValueError(f"expected embeddings for {len(self.feature_norms)} experts, got {len(frozen)}")
        for norm, f in zip(self.feature_norms, frozen):
            if isinstance(norm, FeatureStandardizer):
                norm.fit(f.reshape(-1, f.shape[-1]).float())

    def parameter_report(self) -> dict:
        trainable = sum(p.numel() for p in self.trainable_parameters().values())
        backbone = sum(p.numel() for b in self.backbones for p in b.vision.parameters())
        text = sum(p.numel() for p in self.text_head.text.parameters())
        frozen_total = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        return {"trainable": trainable, "vision_backbones": backbone, "text_tower": text,
                "frozen_total": frozen_total, "percent_of_vision_backbones": 100.0 * trainable / max(backbone, 1),
                "percent_of_all_frozen": 100.0 * trainable / max(frozen_total, 1)}
