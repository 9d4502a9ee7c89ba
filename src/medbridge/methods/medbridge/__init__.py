"""MedBridge (Li, Ghahremani, Wachinger 2025): focal views, QEncoder, view pooling, MoE, label-prompt text head."""

from .adapter import AdapterMismatchError, build_medbridge, load_adapter, save_adapter
from .model import MedBridgeConfig, MedBridgeModel, MedBridgeOutput
from .moe import ExpertMixture
from .pooling import ViewPooling
from .qencoder import QEncoder
from .text_head import LabelTextHead, readable_name

__all__ = ["AdapterMismatchError", "build_medbridge", "load_adapter", "save_adapter", "MedBridgeConfig",
           "MedBridgeModel", "MedBridgeOutput", "ExpertMixture", "ViewPooling", "QEncoder", "LabelTextHead",
           "readable_name"]
