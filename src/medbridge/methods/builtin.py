"""The methods that ship with medbridge, registered explicitly (called once by the registry on first use, with its
``register_method``: this module does not import the registry)."""

from __future__ import annotations

from collections.abc import Callable


def register_builtin_methods(register_method: Callable[..., object]) -> None:
    """Register the shipped methods through ``register_method``."""
    from .baselines import BASELINES, baseline_method_class, baseline_options_class
    from .finetune import (
        FullFineTune,
        FullFineTuneOptions,
        LoraFineTune,
        LoraFineTuneOptions,
        PartialFineTune,
        PartialFineTuneOptions,
    )
    from .linear_probe import LinearProbe, ProbeConfig
    from .medbridge.method import MedBridgeMethod, MedBridgeOptions

    register_method("medbridge", MedBridgeOptions, MedBridgeMethod,
                    description="MedBridge: query tokens in frozen ViTs, focal views, MoE, label prompts")
    register_method("linear-probe", ProbeConfig, LinearProbe, probe=True,
                    description="logistic regression on the frozen pooled embeddings (C chosen on validation)")
    for name, feature_class in BASELINES.items():
        register_method(name, baseline_options_class(feature_class), baseline_method_class(feature_class),
                        group="baseline")
    register_method("full-finetune", FullFineTuneOptions, FullFineTune, group="finetune",
                    description="fine-tune every tower weight + a linear head (whole image, augmentation)")
    register_method("partial-finetune", PartialFineTuneOptions, PartialFineTune, group="finetune",
                    description="fine-tune the last blocks + final norm + a linear head")
    register_method("lora-finetune", LoraFineTuneOptions, LoraFineTune, group="finetune",
                    description="LoRA (peft) on the tower's attention projections + a linear head")
