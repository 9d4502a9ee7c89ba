"""Safe weight loading: checkpoints (never unpickled) and hub errors. (Atomic writes and the cache location:
``medbridge.io``, re-exported here.)"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..io import atomic_write_bytes, cache_dir, unsafe_load_reason  # noqa: F401  (first two re-exported)


class BackboneError(RuntimeError):
    """A backbone could not be built or loaded; the message says why and what to do."""


class HubUnreachableError(BackboneError):
    """The Hugging Face Hub could not be reached (offline machine)."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch file, the latter with ``weights_only=True``.

    TorchScript archives (OpenAI's original CLIP .pt files) are read without executing code through
    ``torch.jit.load``'s state dict. Wrappers such as ``{"state_dict": ...}`` and ``module.`` prefixes are removed.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except RuntimeError as exc:
            if "TorchScript" not in str(exc) and "jit" not in str(exc).lower():
                raise BackboneError(f"cannot read checkpoint {path} safely (weights_only=True): "
                                    f"{unsafe_load_reason(exc)}") from exc
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception as exc:  # pickles with custom classes are refused rather than executed
            raise BackboneError(f"cannot read checkpoint {path} safely (weights_only=True): "
                                f"{unsafe_load_reason(exc)}") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise BackboneError(f"checkpoint {path} does not contain a state dict (got {type(sd).__name__})")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_checkpoint_into(model: nn.Module, path: str | Path) -> None:
    """Load a checkpoint strictly; a wrong architecture gives an error naming missing/unexpected keys."""
    sd = read_state_dict(path)
    if hasattr(model, "text") and "text_projection" in sd:  # plain CLIP checkpoint into CustomTextCLIP
        from open_clip.model import convert_to_custom_text_state_dict

        sd = convert_to_custom_text_state_dict(sd)
    own = model.state_dict()
    # OpenAI checkpoints carry input_resolution/context_length/vocab_size scalars that are not parameters
    sd = {k: v for k, v in sd.items() if k in own or k not in ("input_resolution", "context_length", "vocab_size")}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or mismatched:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" … (+{len(keys) - 8} more)" if len(keys) > 8 else "")

        parts = [f"checkpoint {path} does not match architecture {type(model).__name__}:"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {show(unexpected)}")
        if mismatched:
            parts.append("shape mismatch: " + show([f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
                                                     for k in mismatched]))
        raise BackboneError("\n  ".join(parts))
    model.load_state_dict(sd, strict=True)


def is_hub_error(exc: BaseException) -> bool:
    """True when an exception (or its cause chain) comes from failing to reach the Hugging Face Hub."""
    names = {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError", "ConnectTimeout",
             "MaxRetryError", "NameResolutionError", "HfHubHTTPError", "RepositoryNotFoundError", "gaierror"}
    seen = 0
    while exc is not None and seen < 10:
        if type(exc).__name__ in names or "huggingface.co" in str(exc) or "offline" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def hub_unreachable(source: str, exc: BaseException) -> HubUnreachableError:
    return HubUnreachableError(
        f"could not load {source!r}: the Hugging Face Hub is unreachable from this machine ({type(exc).__name__}).\n"
        "  Download the model elsewhere and use 'local-dir:/path/to/folder' (a folder with config + weights),\n"
        "  pass a checkpoint file as 'NAME@/path/to/weights.pt', or use a bundled model such as "
        "'bundled:dinov2-small+minilm-l6' (see `medbridge list backbones`)."
    )
