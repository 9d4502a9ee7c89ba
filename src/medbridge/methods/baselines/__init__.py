"""Baseline adaptation methods (specs/baselines.md), one module per family; each is registered as a method by
``methods/builtin.py`` through :func:`baseline_method_class`."""

from __future__ import annotations

from ...backbones import Backbone
from .adapters import ClipAdapter, LPText
from .base import FeatureMethod, Hparams, NotApplicableError, require_aligned_text
from .method import BaselineMethod, baseline_method_class, baseline_options_class
from .mma import MMA
from .mmrl import MMRL
from .prompt_learning import CoCoOp, CoOp, KgCoOp, ProGrad, PromptLearner
from .zero_shot import ZeroShot

#: Feature-space baselines: registry name -> FeatureMethod class (the linear probe is methods/linear_probe.py,
#: MedBridge methods/medbridge/).
BASELINES: dict[str, type[FeatureMethod]] = {
    "zero-shot": ZeroShot, "coop": CoOp, "cocoop": CoCoOp, "kgcoop": KgCoOp, "prograd": ProGrad,
    "clip-adapter": ClipAdapter, "lp-text": LPText, "mma": MMA, "mmrl": MMRL,
}


def build_baseline(name: str, backbone: Backbone, labels: list[str], names: list[str], **kwargs) -> FeatureMethod:
    """The bare feature-space module of a baseline (tests and research code; runs use ``create_method``)."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}")
    return BASELINES[name](backbone, labels, names, **kwargs)


__all__ = ["BASELINES", "BaselineMethod", "FeatureMethod", "Hparams", "NotApplicableError", "PromptLearner",
           "baseline_method_class", "baseline_options_class", "build_baseline", "require_aligned_text",
           "ZeroShot", "CoOp", "CoCoOp", "KgCoOp", "ProGrad", "ClipAdapter", "LPText", "MMA", "MMRL"]
