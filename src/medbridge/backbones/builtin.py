"""The backbone families and named backbones that ship with medbridge, registered explicitly (called once by the
registry on first use). Each family's registration sits beside its code, in a ``register_family()`` function."""

from __future__ import annotations


def register_builtin_backbones() -> None:
    from . import bundled, hf, openclip, timm_vit, vlm

    for module in (bundled, openclip, hf, timm_vit, vlm):  # the order `medbridge list backbones` shows
        module.register_family()
