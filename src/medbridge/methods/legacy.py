"""The one converter for what medbridge 0.1 wrote: saved methods and run-config keys, read into the current form.

Files: MedBridge adapters (``adapter_config.json``), linear probes (``probe_config.json``) and baselines
(``baseline_config.json``) are converted into what an ``adapter.json`` says (:func:`read_legacy`); the registry
builds and checks them like any saved method. Config sections ``model`` / ``probe`` / ``baseline`` and keys like
``model.num_queries`` are rewritten to the current keys with a :class:`DeprecationWarning` naming the new key.
This module imports neither the registry nor torch."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from ..io import CorruptFileError, read_json

LEGACY_CONFIGS = ("adapter_config.json", "probe_config.json", "baseline_config.json")
#: run-config sections of medbridge 0.1 and the method (or group) whose options they held
LEGACY_SECTIONS = {"model": "medbridge", "probe": "linear-probe", "baseline": "baseline"}
#: MedBridge config fields a 0.1 adapter kept beside its options (the run supplies them now)
_RUN_SUPPLIED = ("labels", "prompt_names", "backbones", "focal")
log = logging.getLogger(__name__)


def _v01_prompt_name(label: str) -> str:
    """How medbridge 0.1 named a label in prompts when its file gave no names (kept so that such files score as
    they were trained; current code uses :func:`medbridge.methods.prompts.prompt_name`)."""
    return label.replace("_", " ").strip().lower()


def _format(meta: object, where: Path, expected: str) -> dict:
    if not isinstance(meta, dict) or meta.get("format") != expected:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise CorruptFileError(f"{where}: unknown format {fmt!r}")
    return meta


def read_legacy(folder: Path) -> dict:
    """A medbridge 0.1 method folder as the fields of a current ``adapter.json`` (``method``, ``options``,
    ``labels``, ``prompt_names``, ``focal``, ``backbones``: fingerprints or None when the file kept none, ``info``,
    ``weights_sha256``: None when the file kept none) plus ``sources`` (the backbone source strings), ``weights``
    (the tensor file) and ``where`` (the config file)."""
    try:
        return _read_legacy(folder)
    except (KeyError, TypeError) as exc:
        raise CorruptFileError(f"{folder}: a medbridge 0.1 file lacks or mistypes {exc}") from exc


def _read_legacy(folder: Path) -> dict:
    if (folder / "adapter_config.json").is_file():
        where = folder / "adapter_config.json"
        meta = _format(read_json(where, "adapter config"), where, "medbridge-adapter/1")
        config = {"feature_norm": "none", **meta["config"]}  # adapters older than feature_norm
        labels = config["labels"]
        out = {"method": "medbridge", "options": {k: v for k, v in config.items() if k not in _RUN_SUPPLIED},
               "labels": labels, "prompt_names": config.get("prompt_names") or [_v01_prompt_name(x) for x in labels],
               "focal": config.get("focal", {}), "backbones": meta["backbones"], "sources": config["backbones"],
               "info": {}, "weights": folder / "adapter.safetensors"}
    elif (folder / "probe_config.json").is_file():
        where = folder / "probe_config.json"
        meta = _format(read_json(where, "linear-probe config"), where, "medbridge-probe/1")
        labels = meta["labels"]
        out = {"method": "linear-probe", "options": meta.get("probe", {}), "labels": labels,
               "prompt_names": meta.get("prompt_names") or [_v01_prompt_name(x) for x in labels],
               "focal": meta["focal"], "backbones": None, "sources": meta["backbones"],
               "info": {k: meta[k] for k in ("C", "val_auroc_by_C") if k in meta},
               "weights": folder / "probe.safetensors"}
    else:
        where = folder / "baseline_config.json"
        meta = _format(read_json(where, "baseline config"), where, "medbridge-baseline/1")
        out = {"method": meta["method"], "options": {**meta.get("config", {}), "template": meta["template"]},
               "labels": meta["labels"], "prompt_names": meta["names"], "focal": {"num_crops": 0},
               "backbones": None, "sources": [meta["backbone"]], "info": {"fit": meta.get("fit", {})},
               "weights": folder / "baseline.safetensors"}
    warnings.warn(f"{where}: a medbridge 0.1 file ({meta['format']}); medbridge.save_method(load_method(folder), "
                  "folder) writes it as adapter.json (medbridge-method/2)", DeprecationWarning, stacklevel=4)
    if "weights_sha256" not in meta:  # medbridge 0.1 files written before weight digests
        log.warning("%s: no weights_sha256 beside it (a medbridge 0.1 file): the weights cannot be checked",
                    out["weights"])
    return {**out, "weights_sha256": meta.get("weights_sha256"), "where": where}


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"config key {old!r} is a medbridge 0.1 key: use {new!r}", DeprecationWarning, stacklevel=4)


def migrate_legacy_config(d: dict) -> dict:
    """A run config dict of medbridge 0.1 (``model`` = MedBridge options + backbones + focal, ``probe``,
    ``baseline``) in the current form (``backbones``, ``focal``, ``method_options``); current keys win. Every
    old key read gives a DeprecationWarning naming its new key."""
    d = dict(d)
    options = {k: dict(v) for k, v in (d.get("method_options") or {}).items()}
    model = dict(d.get("model") or {})
    if "backbones" in model:
        _deprecated("model.backbones", "backbones")
        d.setdefault("backbones", model.pop("backbones"))
    if "focal" in model:
        _deprecated("model.focal", "focal")
        d["focal"] = {**model.pop("focal"), **(d.get("focal") or {})}
    d["model"] = model
    for section, target in LEGACY_SECTIONS.items():
        legacy = d.pop(section, None) or {}
        if legacy:
            for key in legacy:
                _deprecated(f"{section}.{key}", f"method_options.{target}.{key}")
            options[target] = {**legacy, **options.get(target, {})}
    if options:
        d["method_options"] = options
    return d


def migrate_legacy_key(key: str) -> str:
    """An override key of medbridge 0.1 in the current form (with a DeprecationWarning naming it):
    ``model.backbones`` -> ``backbones``, ``model.focal.x`` -> ``focal.x``, ``model.x`` ->
    ``method_options.medbridge.x``, ``probe.x`` / ``baseline.x`` -> ``method_options.linear-probe.x`` /
    ``method_options.baseline.x``."""
    head, _, rest = key.partition(".")
    new = key
    if head == "model" and rest.split(".")[0] in ("backbones", "focal"):
        new = rest
    elif head in LEGACY_SECTIONS and rest:
        new = f"method_options.{LEGACY_SECTIONS[head]}.{rest}"
    if new != key:
        _deprecated(key, new)
    return new
