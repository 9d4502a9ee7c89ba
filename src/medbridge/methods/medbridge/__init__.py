"""MedBridge (Li, Ghahremani, Wachinger 2025): focal views, QEncoder, view pooling, MoE, label-prompt text head."""

from .adapter import build_medbridge
from .method import MedBridgeMethod, MedBridgeOptions
from .model import MedBridgeConfig, MedBridgeModel, MedBridgeOutput
from .moe import ExpertMixture
from .pooling import ViewPooling
from .qencoder import QEncoder
from .text_head import LabelTextHead

__all__ = ["build_medbridge", "MedBridgeConfig", "MedBridgeMethod", "MedBridgeModel", "MedBridgeOptions",
           "MedBridgeOutput", "ExpertMixture", "ViewPooling", "QEncoder", "LabelTextHead"]
