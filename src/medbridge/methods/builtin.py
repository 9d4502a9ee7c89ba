"""The methods that ship with medbridge, registered explicitly (called once by the registry on first use)."""

from __future__ import annotations


def register_builtin_methods() -> None:
    from .baselines import BASELINES, baseline_method_class, baseline_options_class
    from .linear_probe import LinearProbe, ProbeConfig
    from .medbridge.method import MedBridgeMethod, MedBridgeOptions
    from .registry import register_method

    register_method("medbridge", MedBridgeOptions, MedBridgeMethod,
                    description="MedBridge: query tokens in frozen ViTs, focal views, MoE, label prompts")
    register_method("linear-probe", ProbeConfig, LinearProbe,
                    description="logistic regression on the frozen pooled embeddings (C chosen on validation)")
    for name, feature_class in BASELINES.items():
        register_method(name, baseline_options_class(feature_class), baseline_method_class(feature_class),
                        group="baseline")
