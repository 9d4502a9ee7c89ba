"""Fine-tuning the vision tower: full, last blocks, or LoRA (peft)."""

from .method import (
    FineTuneMethod,
    FullFineTune,
    FullFineTuneOptions,
    LoraFineTune,
    LoraFineTuneOptions,
    PartialFineTune,
    PartialFineTuneOptions,
)

__all__ = ["FineTuneMethod", "FullFineTune", "FullFineTuneOptions", "LoraFineTune", "LoraFineTuneOptions",
           "PartialFineTune", "PartialFineTuneOptions"]
