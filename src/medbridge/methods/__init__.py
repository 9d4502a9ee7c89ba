"""Adaptation methods on frozen backbones (MedBridge; baselines plug in beside it)."""
