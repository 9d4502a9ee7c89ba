"""Read only some tensors (a VLM's vision tower and projector) from a safetensors checkpoint, sharded or not.

A vision-language checkpoint is mostly language model (a 7B LLaVA holds 0.3B vision parameters). The index file
(``model.safetensors.index.json``) maps every tensor name to its shard; we open just the shards that hold the
wanted prefixes and read just those tensors through ``safetensors.safe_open`` (memory-mapped: the language
model's bytes are never read, so they never count towards the process's memory).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from .loading import BackboneError

INDEX = "model.safetensors.index.json"
NON_PERSISTENT_BUFFERS = ("position_ids", "inv_freq")
# Wrappers one transformers major version has and the other not: 4.x saves and builds CLIP / SigLIP vision towers as
# ``vision_model.embeddings...``, 5.x as ``embeddings...`` (and reads either); so do we.
LAYOUT_WRAPPERS = ("vision_model.",)
SINGLE = "model.safetensors"


def checkpoint_weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file name for a transformers checkpoint folder (index file or one safetensors file)."""
    index = folder / INDEX
    if index.is_file():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (ValueError, KeyError, TypeError) as exc:
            raise BackboneError(f"{index}: not a safetensors index (expected a 'weight_map' object): {exc}") from exc
    single = folder / SINGLE
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), SINGLE)
    raise BackboneError(f"{folder}: no {INDEX} or {SINGLE} (vision towers are read from safetensors checkpoints; "
                        "re-save the model with save_pretrained(safe_serialization=True))")


def select_prefixed(weight_map: dict[str, str], prefixes: Iterable[str]) -> dict[str, str]:
    """Checkpoint names under the first of ``prefixes`` that any name uses -> name with that prefix removed.

    VLM checkpoints name the same module differently across transformers versions (``vision_tower.`` in files
    saved by transformers, ``model.vision_tower.`` in some hub uploads): the first prefix present wins.
    """
    for prefix in prefixes:
        chosen = {k: k[len(prefix):] for k in weight_map if k.startswith(prefix)}
        if chosen:
            return chosen
    return {}


def to_module_names(chosen: dict[str, str], own: Iterable[str]) -> dict[str, str]:
    """``chosen`` (checkpoint name -> name in the module) with a :data:`LAYOUT_WRAPPERS` prefix removed or added
    where the checkpoint was saved under the other transformers layout than the module's."""
    own = list(own)
    for wrapper in LAYOUT_WRAPPERS:
        in_module = any(k.startswith(wrapper) for k in own)
        in_checkpoint = any(v.startswith(wrapper) for v in chosen.values())
        if in_checkpoint and not in_module:
            chosen = {k: v.removeprefix(wrapper) for k, v in chosen.items()}
        elif in_module and not in_checkpoint:
            chosen = {k: wrapper + v for k, v in chosen.items()}
    return chosen


def read_tensors(folder: Path, names: Iterable[str], weight_map: dict[str, str] | None = None,
                 read_log: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Read exactly ``names`` from the shards that hold them (``read_log``, when given, records each name read)."""
    from safetensors import safe_open

    weight_map = weight_map if weight_map is not None else checkpoint_weight_map(folder)
    by_shard: dict[str, list[str]] = {}
    for name in names:
        if name not in weight_map:
            raise BackboneError(f"{folder}: tensor {name!r} is not in the checkpoint")
        by_shard.setdefault(weight_map[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for shard, shard_names in sorted(by_shard.items()):
        path = folder / shard
        if not path.is_file():
            raise BackboneError(f"{folder}: shard {shard} named by the index is missing")
        with safe_open(str(path), framework="pt") as f:
            for name in shard_names:
                out[name] = f.get_tensor(name)
                if read_log is not None:
                    read_log.append(name)
    return out


def load_submodule(module: torch.nn.Module, folder: Path, prefixes: Iterable[str],
                   weight_map: dict[str, str] | None = None, read_log: list[str] | None = None,
                   what: str = "module") -> None:
    """Fill ``module`` strictly from the checkpoint tensors under one of ``prefixes`` (nothing else is read)."""
    prefixes = list(prefixes)
    weight_map = weight_map if weight_map is not None else checkpoint_weight_map(folder)
    chosen = select_prefixed(weight_map, prefixes)
    if not chosen:
        raise BackboneError(f"{folder}: no {what} tensors in the checkpoint (looked for names starting with "
                            f"{' or '.join(repr(p) for p in prefixes)})")
    own = module.state_dict()
    chosen = to_module_names(chosen, own)
    # non-persistent buffers some older saves still carry (recomputed by the module itself, never read)
    chosen = {k: v for k, v in chosen.items() if v in own or not v.endswith(NON_PERSISTENT_BUFFERS)}
    tensors = read_tensors(folder, chosen, weight_map, read_log)
    state = {chosen[k]: v for k, v in tensors.items()}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad:
        raise BackboneError(
            f"{folder}: the {what} tensors do not match the config's architecture: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {bad[:5]}")
    module.load_state_dict(state, strict=True)


def hub_vision_snapshot(repo: str, prefixes: Iterable[str]) -> Path:
    """Download from the Hub only the config/processor files and the shards that hold ``prefixes`` tensors."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    prefixes = tuple(prefixes)
    patterns = ["config.json", "preprocessor_config.json"]
    try:  # the hub cache answers when offline
        index = Path(hf_hub_download(repo, INDEX))
    except EntryNotFoundError:
        patterns.append(SINGLE)
    else:
        weight_map = json.loads(index.read_text())["weight_map"]
        patterns += [INDEX] + sorted({weight_map[k] for k in weight_map if k.startswith(prefixes)})
    return Path(snapshot_download(repo, allow_patterns=patterns))
