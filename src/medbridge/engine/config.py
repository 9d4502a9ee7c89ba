"""Run configuration: dataclasses with help text and validation, YAML presets, ``key=value`` overrides."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from ..backbones import DEFAULT_BACKBONE
from ..data.cases import IMAGE_LABELS, UNITS
from ..data.focal import FocalConfig
from ..defaults import PRESET_DIR, is_study_file, list_presets
from ..fieldcheck import FieldTypeError, check_fields
from ..methods.api import OptionsError
from ..methods.legacy import LEGACY_SECTIONS, migrate_legacy_config, migrate_legacy_key
from ..methods.registry import check_method_options, default_method, get_method, list_methods, method_groups
from .stats import DEFAULT_N_BOOT


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key and what is allowed."""


@dataclass
class DataConfig:
    path: str = ""  # dataset folder or CSV file
    format: str = "auto"  # a registered dataset format (medbridge list datasets) or auto (detect)
    options: dict = field(default_factory=dict)  # loader options, e.g. {uncertain: ones}
    split: str = "auto"  # auto (official if the dataset has one, else patient), official, patient
    fractions: list = field(default_factory=lambda: [0.7, 0.1, 0.2])  # train/val/test for patient splits
    split_seed: int = 0  # seed of the patient split and the label fraction
    label_fraction: float = 1.0  # share of training labels used (1%, 10%, 50%, 100% protocols)
    split_file: str | None = None  # reuse a saved split (overrides split/fractions/split_seed)
    views: str | None = None  # keep only these views: frontal, lateral, PA, AP (None: all)
    skip_unreadable: bool = False  # skip corrupt/missing images (counted in the log) instead of failing
    # what a sample is: image, case (several images: an ODIR patient's two eyes, a MIMIC study), or auto (the
    # dataset's default: case for ODIR-5K, image otherwise); labels, splits, metrics and predictions follow it
    unit: str = "auto"
    # under unit: case, what a method that scores images one by one (the linear probe; MedBridge with
    # case_views off) is trained on: case (each image with its case's labels) or own (each image with its own
    # labels: ODIR-5K's per-eye labels from the diagnostic keywords; a MIMIC study's images carry the study's)
    case_image_labels: str = "case"

    def validate(self) -> None:
        if self.split not in ("auto", "official", "patient"):
            raise ConfigError(f"data.split: {self.split!r} is not one of auto, official, patient")
        for key, allowed in (("unit", UNITS), ("case_image_labels", IMAGE_LABELS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"data.{key}: {getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if not 0 < float(self.label_fraction) <= 1:
            raise ConfigError(f"data.label_fraction must be in (0, 1], got {self.label_fraction}")
        if len(self.fractions) != 3 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1
                                               for x in self.fractions):
            raise ConfigError(f"data.fractions: {self.fractions!r} is not three numbers in [0, 1] (train, val, test)")


@dataclass
class TrainConfig:
    lr: float = 5e-4  # AdamW learning rate (paper)
    weight_decay: float = 0.01
    batch_size: int = 16  # paper
    epochs: int = 3  # paper
    schedule: str = "constant"  # constant or cosine learning rate
    # keep the weights of the epoch with the best validation macro AUROC instead of the last epoch's
    keep_best: bool = False
    patience: int = 0  # stop after this many epochs without a better validation macro AUROC (0: every epoch)
    seed: int = 0  # model init and batch order
    # seed ensemble: N members (seeds seed..seed+N-1), probabilities averaged; a number for every seed-dependent
    # method of the run, or {method: N} for some (the demo preset: {medbridge: 3})
    ensemble: int | dict = 1
    workers: int = 2  # DataLoader workers for decoding / cache building
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:1
    amp: bool = True  # bfloat16 autocast on GPU (ignored on CPU)
    cache: str | bool = "auto"  # frozen-activation cache: auto, full, prefix, pooled, none (old true/false: auto/none)
    cache_budget: str | None = None  # disk budget of the cache: 20G, 500M, 50% (of free); default 80% of free
    cache_dir: str | None = None  # default: $MEDBRIDGE_CACHE/features or the user cache dir
    checkpoint_every: int = 50  # steps between checkpoints (and at each epoch end)
    eval_batch_size: int = 32

    def validate(self) -> None:
        for name in ("lr", "batch_size", "epochs", "eval_batch_size"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"train.{name} must be > 0, got {getattr(self, name)}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"train.device: {self.device!r} is not one of auto, cpu, cuda, cuda:N")
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"train.schedule: {self.schedule!r} is not one of constant, cosine")
        sizes = self.ensemble.items() if isinstance(self.ensemble, dict) else [("", self.ensemble)]
        for name, size in sizes:
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                key = f"train.ensemble.{name}" if name else "train.ensemble"
                raise ConfigError(f"{key} must be a whole number >= 1 (members of a seed ensemble), got {size!r}")
        if self.workers < 0 or self.checkpoint_every < 0:
            raise ConfigError("train.workers and train.checkpoint_every must be >= 0")
        if not isinstance(self.patience, int) or isinstance(self.patience, bool) or self.patience < 0:
            raise ConfigError(f"train.patience must be an integer >= 0, got {self.patience!r}")
        if not isinstance(self.keep_best, bool):
            raise ConfigError(f"train.keep_best must be true or false, got {self.keep_best!r}")
        from .cache import parse_size
        from .features import CACHE_MODES

        if isinstance(self.cache, bool):  # config files from before the cache modes
            self.cache = "auto" if self.cache else "none"
        if self.cache not in CACHE_MODES:
            raise ConfigError(f"train.cache: {self.cache!r} is not one of {', '.join(CACHE_MODES)}")
        if self.cache_budget is not None:
            try:
                budget = str(self.cache_budget).strip()
                float(budget[:-1]) if budget.endswith("%") else parse_size(budget)
            except ValueError as exc:
                raise ConfigError(f"train.cache_budget: {exc}") from exc

    def ensemble_for(self, method: str) -> int:
        """Members of the seed ensemble ``method`` trains as (1: a single model)."""
        return self.ensemble.get(method, 1) if isinstance(self.ensemble, dict) else self.ensemble


@dataclass
class EvalConfig:
    calibrate: str = "none"  # post-hoc calibration fitted on validation: none, temperature, platt (per class)
    n_boot: int = DEFAULT_N_BOOT  # patient-bootstrap resamples per 95% interval (0: no intervals); --n-boot

    def validate(self) -> None:
        from .calibration import KINDS

        if self.calibrate not in KINDS:
            raise ConfigError(f"eval.calibrate: {self.calibrate!r} is not one of {', '.join(KINDS)}")
        if self.n_boot < 0:
            raise ConfigError(f"eval.n_boot: {self.n_boot} is not >= 0 (0: no intervals)")


@dataclass
class RunConfig:
    """Everything a run needs; saved as ``config.yaml`` in the run folder.

    ``method_options`` holds options per registered method name (``medbridge: {num_queries: 16}``) or per method
    group (``baseline: {epochs: 10}`` applies to every baseline), each validated by the method's registered
    options dataclass. ``companions`` are methods fitted beside ``method`` on the same split (and on its cache
    when they can read it), e.g. ``[linear-probe]`` in the demo. Older config files (sections ``model``,
    ``probe``, ``baseline``) are read into this form (:func:`config_from_dict`)."""

    method: str = field(default_factory=default_method)  # a registered method (medbridge list methods)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    backbones: list = field(default_factory=lambda: [DEFAULT_BACKBONE])  # backbone sources; several = experts
    focal: dict = field(default_factory=dict)  # focal views (data.focal.FocalConfig fields)
    method_options: dict = field(default_factory=dict)  # {method or group: {option: value}}
    companions: list = field(default_factory=list)  # methods fitted beside `method` on the same split
    eval: EvalConfig = field(default_factory=EvalConfig)  # evaluation options (post-hoc calibration)

    def validate(self) -> None:
        names, groups = list_methods(), method_groups()
        for m in [self.method, *self.companions]:
            try:
                get_method(m)  # close-match error for unknown names
            except OptionsError as exc:
                raise ConfigError(str(exc)) from exc
        if self.method in self.companions:
            raise ConfigError(f"companions: {self.method!r} is the run's method already")
        for key in self.method_options:
            if key not in names and key not in groups:
                raise ConfigError(f"method_options.{key}: not a registered method or group; methods: "
                                  f"{', '.join(names)}; groups: {', '.join(groups)}")
            if not isinstance(self.method_options[key], dict):
                raise ConfigError(f"method_options.{key}: expected a mapping of options, got "
                                  f"{self.method_options[key]!r}")
        self.data.validate()
        self.train.validate()
        self.eval.validate()
        for key in self.train.ensemble if isinstance(self.train.ensemble, dict) else []:
            if key not in names:
                raise ConfigError(f"train.ensemble.{key}: not a registered method; methods: {', '.join(names)}")
        if not self.backbones or not all(isinstance(b, str) and b for b in self.backbones):
            raise ConfigError(f"backbones: expected a non-empty list of backbone sources, got {self.backbones!r}")
        self.focal = _coerce("focal", FocalConfig, self.focal)
        try:
            FocalConfig(**self.focal)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"focal: {exc}") from exc
        for m in [self.method, *self.companions]:
            try:
                check_method_options(m, self.options_for(m))
            except OptionsError as exc:
                raise ConfigError(str(exc)) from exc

    def options_for(self, name: str) -> dict:
        """Options of one method: its group's, then its own."""
        group = get_method(name).group
        return {**(self.method_options.get(group, {}) if group else {}), **self.method_options.get(name, {})}

    def focal_config(self) -> FocalConfig:
        return FocalConfig(**self.focal)

    def to_dict(self) -> dict:
        return asdict(self)


def _merge(base: dict, update: dict, where: str = "") -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("options",):
            out[k] = _merge(out[k], v, f"{where}{k}.")
        else:
            out[k] = v
    return out


def _parse_value(text: str):
    """YAML value, with numbers YAML 1.1 leaves as strings (``1e-3``) read as numbers."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
    return value


def _coerce(section: str, cls, values: dict) -> dict:
    """Values of one section checked against the field types (numbers given as text cast); errors name the key."""
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected a mapping of {section} settings, got {values!r}")
    try:
        return check_fields(cls, values, section)
    except FieldTypeError as exc:
        raise ConfigError(str(exc)) from exc


def _check_sections(d: dict) -> dict:
    """The sections (current and medbridge 0.1's) are mappings, before anything reads into them."""
    for key in ("data", "train", "focal", "method_options", *LEGACY_SECTIONS):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise ConfigError(f"{key}: expected a mapping of {key} settings, got {d[key]!r}")
    for key, value in {**(d.get("method_options") or {}), **{f"model.{k}": v for k, v in (d.get("model") or {})
                                                               .items() if k == "focal"}}.items():
        if not isinstance(value, dict):
            where = key if key.startswith("model.") else f"method_options.{key}"
            raise ConfigError(f"{where}: expected a mapping of options, got {value!r}")
    return d


def _check_top_level(d: dict) -> None:
    """The top-level keys that are not sections: their types (``method: 3`` or ``companions: x`` fail here)."""
    try:
        check_fields(RunConfig, {k: v for k, v in d.items() if v is not None}, "", skip=("data", "train"))
    except FieldTypeError as exc:
        raise ConfigError(str(exc)) from exc
    if "backbones" in d and d["backbones"] is not None and not d["backbones"]:
        raise ConfigError("backbones: empty list; give at least one backbone source (e.g. "
                          f"[{DEFAULT_BACKBONE}], the default)")
    for key in ("backbones", "companions"):
        for i, item in enumerate(d.get(key) or []):
            if not isinstance(item, str) or not item:
                raise ConfigError(f"{key}[{i}]: {item!r} is not a name (expected text)")


def config_from_dict(d: dict) -> RunConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"expected a mapping of config sections, got {type(d).__name__}")
    d = migrate_legacy_config(_check_sections(d))
    known = {f.name for f in fields(RunConfig)}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown top-level key; allowed: {sorted(known)}")
    _check_top_level(d)
    try:
        cfg = RunConfig(method=d.get("method") or default_method(),
                        data=DataConfig(**_coerce("data", DataConfig, d.get("data", {}))),
                        train=TrainConfig(**_coerce("train", TrainConfig, d.get("train", {}))),
                        backbones=list(d.get("backbones") or [DEFAULT_BACKBONE]), focal=dict(d.get("focal") or {}),
                        method_options=dict(d.get("method_options") or {}),
                        companions=list(d.get("companions") or []),
                        eval=EvalConfig(**_coerce("eval", EvalConfig, d.get("eval") or {})))
    except TypeError as exc:  # unknown field in a section
        section = next((n for n, c in (("data", DataConfig), ("eval", EvalConfig)) if c.__name__ in str(exc)), "train")
        allowed = [f.name for f in fields({"data": DataConfig, "eval": EvalConfig}.get(section, TrainConfig))]
        raise ConfigError(f"{section}: {exc}; allowed keys: {allowed}") from exc
    except OptionsError as exc:
        raise ConfigError(str(exc)) from exc
    cfg.validate()
    return cfg


def read_config_file(path: Path) -> dict:
    """A YAML config file as a mapping (safe loader: no Python tags); errors name the file and line, one line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file ({exc.reason} at byte {exc.start})") from exc
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not a valid YAML config{where}: {' '.join(str(problem).split())}") from exc
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections (method:, data:, train:, ...) at the top "
                          f"level, got a {type(d).__name__}")
    return d


def load_config(preset: str | None = None, files: list[str] | None = None,
                overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- preset (name in presets/ or a YAML path) <- config files <- ``key.sub=value`` overrides."""
    # defaults are filled in by the dataclasses (config_from_dict)
    d: dict = {"data": {"options": {}}, "train": {}, "eval": {}}
    sources = []
    if preset:
        p = Path(preset) if preset.endswith((".yaml", ".yml")) else PRESET_DIR / f"{preset}.yaml"
        if not p.is_file():
            raise ConfigError(f"preset {preset!r} not found; available: {list_presets()}")
        if is_study_file(p):
            raise ConfigError(f"preset {preset!r}: {p} is an ablation study (medbridge ablate --study {preset}), "
                              f"not a run preset; run presets: {list_presets()}")
        sources.append(p)
    sources += [Path(f) for f in files or []]
    for p in sources:
        if not p.is_file():
            raise ConfigError(f"config file {p} not found")
        d = _merge(d, migrate_legacy_config(_check_sections(read_config_file(p))))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=1e-3")
        key, value = item.split("=", 1)
        parts = migrate_legacy_key(key.strip()).split(".")
        node = d
        # option sections are validated by the methods' registered options classes afterwards
        free_form = parts[0] in ("method_options", "focal", "model", "probe", "baseline")
        for i, part in enumerate(parts[:-1]):
            if isinstance(node.get(part), dict):
                node = node[part]
            elif free_form or (i > 0 and parts[i - 1] == "options"):
                node = node.setdefault(part, {})
            else:
                raise ConfigError(f"override {key!r}: {'.'.join(parts[:i + 1])} is not a config section")
        node[parts[-1]] = _parse_value(value)
    return config_from_dict(d)


def save_config(cfg: RunConfig, path: Path) -> None:
    from ..io import atomic_write_bytes

    atomic_write_bytes(path, yaml.safe_dump(json.loads(json.dumps(cfg.to_dict(), default=str)),
                                            sort_keys=False).encode())


__all__ = ["ConfigError", "DataConfig", "TrainConfig", "EvalConfig", "RunConfig", "load_config", "save_config",
           "list_presets", "config_from_dict"]
