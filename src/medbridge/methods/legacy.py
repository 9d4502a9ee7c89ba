"""Files written by medbridge 0.1 before the one method format: MedBridge adapters (``adapter_config.json``),
linear probes (``probe_config.json``) and baselines (``baseline_config.json``) still load, checked the same way."""

from __future__ import annotations

import logging
from pathlib import Path

from ..backbones import Backbone, create_backbone
from ..data.focal import FocalConfig
from ..io import CorruptFileError, load_tensors, read_json
from .api import Method

LEGACY_CONFIGS = ("adapter_config.json", "probe_config.json", "baseline_config.json")
log = logging.getLogger(__name__)


def _focal(values: object, where: Path) -> FocalConfig:
    try:
        return FocalConfig.from_dict(values, f"{where}: focal")
    except ValueError as exc:
        raise CorruptFileError(str(exc)) from exc


def load_legacy(folder: Path, backbones: list[Backbone] | None = None) -> Method:
    from .registry import check_backbones, get_method

    if (folder / "adapter_config.json").is_file():
        meta = read_json(folder / "adapter_config.json", "adapter config")
        if meta.get("format") != "medbridge-adapter/1":
            raise CorruptFileError(f"{folder / 'adapter_config.json'}: unknown format {meta.get('format')!r}")
        config = {"feature_norm": "none", **meta["config"]}  # adapters older than feature_norm
        bbs = backbones or [create_backbone(s) for s in config["backbones"]]
        check_backbones(folder, meta["backbones"], bbs)
        entry = get_method("medbridge")
        run_supplied = ("labels", "prompt_names", "backbones", "focal")
        opts = entry.method_class.check_options({k: v for k, v in config.items() if k not in run_supplied})
        from .medbridge.text_head import readable_name

        labels = config["labels"]
        names = config.get("prompt_names") or [readable_name(x) for x in labels]
        focal = _focal(config.get("focal", {}), folder / "adapter_config.json")
        method = entry.method_class.build(opts, bbs, labels, names, focal)
        weights = folder / "adapter.safetensors"
    elif (folder / "probe_config.json").is_file():
        meta = read_json(folder / "probe_config.json", "linear-probe config")
        if meta.get("format") != "medbridge-probe/1":
            raise CorruptFileError(f"{folder / 'probe_config.json'}: unknown format {meta.get('format')!r}")
        bbs = backbones or [create_backbone(s) for s in meta["backbones"]]
        entry = get_method("linear-probe")
        opts = entry.method_class.check_options(meta.get("probe", {}))
        labels = meta["labels"]
        from .medbridge.text_head import readable_name

        names = meta.get("prompt_names") or [readable_name(x) for x in labels]
        method = entry.method_class.build(opts, bbs, labels, names, _focal(meta["focal"], folder / "probe_config.json"))
        method.restore_info({k: meta[k] for k in ("C", "val_auroc_by_C") if k in meta})
        weights = folder / "probe.safetensors"
    else:
        meta = read_json(folder / "baseline_config.json", "baseline config")
        if meta.get("format") != "medbridge-baseline/1":
            raise CorruptFileError(f"{folder / 'baseline_config.json'}: unknown format {meta.get('format')!r}")
        bbs = backbones or [create_backbone(meta["backbone"])]
        entry = get_method(meta["method"])
        opts = entry.method_class.check_options({**meta.get("config", {}), "template": meta["template"]})
        method = entry.method_class.build(opts, bbs, meta["labels"], meta["names"], FocalConfig(num_crops=0))
        method.restore_info({"fit": meta.get("fit", {})})
        weights = folder / "baseline.safetensors"
    if "weights_sha256" not in meta:  # medbridge 0.1 files written before weight digests
        log.warning("%s: no weights_sha256 beside it (a medbridge 0.1 file): the weights cannot be checked", weights)
    method.load_state_tensors(load_tensors(weights, meta.get("weights_sha256")), str(weights))
    return method.eval()


#: run-config sections of medbridge 0.1 and the method (or group) whose options they held
LEGACY_SECTIONS = {"model": "medbridge", "probe": "linear-probe", "baseline": "baseline"}


def migrate_legacy_config(d: dict) -> dict:
    """A run config dict of medbridge 0.1 (``model`` = MedBridge options + backbones + focal, ``probe``,
    ``baseline``) in the current form (``backbones``, ``focal``, ``method_options``); current keys win."""
    d = dict(d)
    options = {k: dict(v) for k, v in (d.get("method_options") or {}).items()}
    model = dict(d.get("model") or {})
    if "backbones" in model:
        d.setdefault("backbones", model.pop("backbones"))
    if "focal" in model:
        d["focal"] = {**model.pop("focal"), **(d.get("focal") or {})}
    d["model"] = model
    for section, target in LEGACY_SECTIONS.items():
        legacy = d.pop(section, None) or {}
        if legacy:
            options[target] = {**legacy, **options.get(target, {})}
    if options:
        d["method_options"] = options
    return d


def migrate_legacy_key(key: str) -> str:
    """An override key of medbridge 0.1 in the current form: ``model.backbones`` -> ``backbones``,
    ``model.focal.x`` -> ``focal.x``, ``model.x`` -> ``method_options.medbridge.x``, ``probe.x`` /
    ``baseline.x`` -> ``method_options.linear-probe.x`` / ``method_options.baseline.x``."""
    head, _, rest = key.partition(".")
    if head == "model" and rest.split(".")[0] in ("backbones", "focal"):
        return rest
    if head in LEGACY_SECTIONS and rest:
        return f"method_options.{LEGACY_SECTIONS[head]}.{rest}"
    return key
