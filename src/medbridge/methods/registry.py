"""One registry of methods: ``register_method``, ``list_methods``, ``create_method``, ``load_method``.

Registration is explicit: :func:`register_method` is called by ``methods/builtin.py`` (the methods that ship
with medbridge, registered on first use of the registry) or by your own code before the engine runs. The CLI's
choices, config validation and ``medbridge list methods`` all read this registry; the engine never names a
method. Every method saves to one format: ``adapter.safetensors`` + ``adapter.json`` (method, options, labels,
prompt names, focal views, backbone fingerprints checked on load, medbridge version, weight digest).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..backbones import Backbone, create_backbone
from ..backbones.base import backbone_fingerprint
from ..data.focal import FocalConfig
from ..io import CorruptFileError, atomic_write_bytes, load_tensors, read_json, save_tensors
from .api import LOOP_HOOKS, ClosedFormFit, Method, OptionsError, missing_hooks
from .ensemble import SeedEnsemble, build_members

WEIGHTS = "adapter.safetensors"
CONFIG = "adapter.json"
FORMAT = "medbridge-method/2"  # /2: config_sha256 covers the JSON's meaning
OLD_FORMATS = ("medbridge-method/1",)  # load with a warning: their JSON is not covered by a digest
#: what adapter.json says about the model (covered by config_sha256); history, dataset name and version are not
MEANING_KEYS = ("format", "method", "options", "labels", "prompt_names", "focal", "backbones", "info", "ensemble",
                "weights_sha256")
log = logging.getLogger(__name__)


class AdapterMismatchError(RuntimeError):
    """A saved method was trained on other backbones than the ones given (or found)."""


@dataclass(frozen=True)
class MethodEntry:
    name: str
    options_class: type
    method_class: type[Method]
    group: str | None  # e.g. "baseline": options under method_options.baseline apply to every member
    description: str
    probe: bool = False  # the companion ``--with-probe`` adds


_REGISTRY: dict[str, MethodEntry] = {}
_BUILTINS_LOADED = False


def register_method(name: str, options_class: type, method_class: type[Method], *, group: str | None = None,
                    description: str = "", replace: bool = False, probe: bool = False) -> type[Method]:
    """Make ``method_class`` (configured by the dataclass ``options_class``) available as ``name`` to the CLI,
    configs, training, evaluation, prediction and loading. ``probe``: the companion ``--with-probe`` fits
    beside a run's method (the last method registered with it wins). A class missing a required hook is refused
    with a message naming the hook."""
    if not isinstance(method_class, type) or not issubclass(method_class, Method):
        raise TypeError(f"register_method({name!r}): {method_class!r} does not derive from medbridge.Method")
    missing = missing_hooks(method_class)
    if missing:
        loop = [h for h in missing if h in LOOP_HOOKS]
        hint = (f" ({', '.join(loop)}: the shared training loop's hooks; a method fitted without the loop derives "
                f"from medbridge.methods.api.{ClosedFormFit.__name__} and implements fit_closed_form)" if loop else "")
        raise TypeError(f"register_method({name!r}): {method_class.__name__} does not implement "
                        f"{', '.join(missing)}{hint}")
    if name in _REGISTRY and not replace and _REGISTRY[name].method_class is not method_class:
        raise ValueError(f"a method named {name!r} is registered already ({_REGISTRY[name].method_class.__name__})")
    method_class.name = name  # the name saved files and configs use
    method_class.options_class = options_class
    doc = (method_class.__doc__ or "").strip().splitlines()
    _REGISTRY[name] = MethodEntry(name, options_class, method_class, group, description or (doc[0] if doc else ""),
                                  probe)
    return method_class


def _registry() -> dict[str, MethodEntry]:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        from .builtin import register_builtin_methods

        register_builtin_methods(register_method)
        load_plugins()
    return _REGISTRY


def load_plugins(spec: str | None = None) -> None:
    """Call the registering functions named in ``$MEDBRIDGE_PLUGINS`` (comma-separated ``module:function``)."""
    import importlib
    import os

    for item in filter(None, (x.strip() for x in (spec or os.environ.get("MEDBRIDGE_PLUGINS", "")).split(","))):
        module, _, func = item.partition(":")
        try:
            fn = getattr(importlib.import_module(module), func or "register")
        except (ImportError, AttributeError, ValueError) as exc:  # ValueError: empty module name (":f")
            raise OptionsError(f"MEDBRIDGE_PLUGINS: cannot load {item!r} ({exc}); expected module:function with "
                               "the module importable") from exc
        if not callable(fn):
            raise OptionsError(f"MEDBRIDGE_PLUGINS: {item!r} is not a function (expected module:function)")
        before = _registered_count()
        try:
            fn()
        except BaseException as exc:  # SystemExit/KeyboardInterrupt from a hook must not end medbridge silently
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise OptionsError(f"MEDBRIDGE_PLUGINS: {item!r} failed: {type(exc).__name__}: {exc}") from exc
        if _registered_count() == before:
            raise OptionsError(f"MEDBRIDGE_PLUGINS: {item!r} registered nothing; a plugin hook calls "
                               "medbridge.register_method(...), register_backbone(...), "
                               "register_backbone_family(...) or register_dataset(...)")


def _registered_count() -> int:
    """Methods, backbones, backbone families and dataset formats registered so far (a plugin hook must add at
    least one)."""
    from ..backbones import list_backbone_families, list_backbones
    from ..data.datasets.registry import registered_count

    return len(_REGISTRY) + len(list_backbones()) + len(list_backbone_families()) + registered_count()


def default_method() -> str:
    """The method a run uses when none is named: MedBridge."""
    return "medbridge"


def probe_method() -> str:
    """The companion ``--with-probe`` fits beside a run's method: the method registered with ``probe=True``."""
    probes = [e.name for e in _registry().values() if e.probe]
    if not probes:
        raise OptionsError("--with-probe: no method is registered as the probe (register_method(..., probe=True))")
    return probes[-1]


def list_methods() -> list[str]:
    """Registered method names, in registration order."""
    return list(_registry())


def method_groups() -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for e in _registry().values():
        if e.group:
            groups.setdefault(e.group, []).append(e.name)
    return groups


def get_method(name: str) -> MethodEntry:
    reg = _registry()
    if name not in reg:
        close = difflib.get_close_matches(name, list(reg), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise OptionsError(f"method {name!r} is not registered{hint} (registered: {', '.join(reg)}; your own methods: "
                           "register_method(...) or MEDBRIDGE_PLUGINS=module:function)")
    return reg[name]


def check_method_options(name: str, options: dict | None, where: str | None = None):
    """Validate options for a registered method; returns the options dataclass."""
    entry = get_method(name)
    return entry.method_class.check_options(options, where or f"method_options.{name}")


def create_method(name: str, options: dict | None = None, *, backbones: list[Backbone | str] | None = None,
                  labels: list[str], prompt_names: list[str] | None = None,
                  focal: FocalConfig | dict | None = None, ensemble: int = 1, seed: int = 0) -> Method:
    """A new, untrained method. ``backbones``: Backbone objects or source strings (default: the bundled one).
    ``ensemble`` > 1: a :class:`SeedEnsemble` of that many members (member i >= 1 initialised with ``seed + i``;
    a method that is not ``seed_dependent`` stays single)."""
    from ..backbones import DEFAULT_BACKBONE
    from .prompts import prompt_name

    entry = get_method(name)
    opts = entry.method_class.check_options(options, f"method_options.{name}")
    bbs = [b if isinstance(b, Backbone) else create_backbone(b) for b in (backbones or [DEFAULT_BACKBONE])]
    focal = focal if isinstance(focal, FocalConfig) else FocalConfig(**(focal or {}))
    names = list(prompt_names) if prompt_names else [prompt_name(x) for x in labels]
    if ensemble > 1 and entry.method_class.seed_dependent:
        return SeedEnsemble(build_members(lambda: entry.method_class.build(opts, bbs, list(labels), names, focal),
                                          ensemble, seed))
    return entry.method_class.build(opts, bbs, list(labels), names, focal)


def save_method(method: Method, folder: str | Path, extra: dict | None = None) -> Path:
    """``adapter.safetensors`` (the method's tensors, never a frozen backbone) + ``adapter.json``, atomically."""
    from ..version import __version__

    folder = Path(folder)
    digest = save_tensors(folder / WEIGHTS, method.state_tensors())
    meta = {"format": FORMAT, "method": method.name, "options": method.saved_options(), "labels": method.labels,
            "prompt_names": method.prompt_names, "focal": method.focal.to_dict(),
            "backbones": method.backbone_fingerprints(), "trainable_parameters":
            method.num_trainable(), "info": method.info(), "medbridge_version": __version__,
            "weights_sha256": digest, **({"ensemble": method.size} if isinstance(method, SeedEnsemble) else {}),
            **(extra or {})}
    meta = json.loads(json.dumps(meta, default=float))  # as it will be read back
    meta["config_sha256"] = config_digest(meta)
    atomic_write_bytes(folder / CONFIG, json.dumps(meta, indent=1, default=float).encode())
    return folder


def config_digest(meta: dict) -> str:
    """SHA-256 of what an adapter.json says about the model (:data:`MEANING_KEYS`), in canonical JSON."""
    meaning = {k: meta.get(k) for k in MEANING_KEYS}
    return hashlib.sha256(json.dumps(meaning, sort_keys=True, default=float).encode()).hexdigest()


def check_labels(where: str, labels: object, prompt_names: object = None) -> None:
    """Labels are distinct non-empty strings (a repeated name would silently drop a label); prompt names, when
    given, one string per label."""
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise CorruptFileError(f"{where}: labels must be a non-empty list of names, got {str(labels)[:200]}")
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise CorruptFileError(f"{where}: label name(s) {repeated} appear more than once; each label needs its own "
                               "name")
    if prompt_names is not None and (not isinstance(prompt_names, list) or len(prompt_names) != len(labels)
                                     or not all(isinstance(x, str) for x in prompt_names)):
        raise CorruptFileError(f"{where}: prompt_names must be {len(labels)} strings, one per label")


def check_backbones(folder: Path, saved: list[dict], given: list[Backbone]) -> None:
    """The saved backbone fingerprints (every field present) match the backbones given."""
    if not isinstance(saved, list) or not all(isinstance(fp, dict) for fp in saved):
        raise CorruptFileError(f"{folder}: backbones must be a list of fingerprints (objects)")
    if len(saved) != len(given):
        raise AdapterMismatchError(f"{folder}: trained on {len(saved)} backbone(s), {len(given)} given")
    for k, (fp, b) in enumerate(zip(saved, given)):
        now = backbone_fingerprint(b)
        missing = [key for key in now if key not in fp]
        if missing:
            raise CorruptFileError(f"{folder}: backbone {k}'s fingerprint lacks {missing} (removed from the file?); "
                                   "the backbone cannot be checked: restore the file or retrain")
        diffs = [f"{key}: saved {fp[key]} vs given {now[key]}" for key in ("width", "depth", "embed_dim",
                 "image_size", "checksum") if fp[key] != now[key]]
        if diffs:
            raise AdapterMismatchError(f"{folder}: backbone {k} was {fp['name']!r} when trained, but {now['name']!r} "
                                       f"differs ({'; '.join(diffs)})")


def model_run_folder(folder: str | Path) -> Path:
    """The run folder whose model a folder stands for: a cross-validation folder (``medbridge demo``, ``--cv``)
    stands for its first fold's run (``fold-0/``); any other folder for itself."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file() and (folder / "fold-0" / "config.yaml").is_file():
        return folder / "fold-0"
    return folder


def saved_method_in(folder: str | Path) -> Path | None:
    """The folder of the saved method that ``folder`` holds: ``folder`` itself, in a run folder the run's method
    (named in its config.yaml), else the first registered method's folder found in it; None when it holds none."""
    from .legacy import LEGACY_CONFIGS

    folder = Path(folder)
    markers = (CONFIG, *LEGACY_CONFIGS)
    if any((folder / m).is_file() for m in markers):
        return folder
    order = []
    cfg = folder / "config.yaml"
    if cfg.is_file():
        import yaml

        try:
            primary = (yaml.safe_load(cfg.read_text()) or {}).get("method")
        except yaml.YAMLError:
            primary = None
        if primary in _registry():
            order.append(folder / get_method(primary).method_class.folder())
    order += [folder / e.method_class.folder() for e in _registry().values()]
    return next((cand for cand in order if any((cand / m).is_file() for m in markers)), None)


def method_folder(folder: str | Path) -> Path:
    """The folder holding a saved method: ``folder`` itself, or in a run folder the run's method (config.yaml),
    else the first saved method found in it (a cross-validation folder: its first fold's)."""
    folder = model_run_folder(folder)
    found = saved_method_in(folder)
    if found is None:
        raise FileNotFoundError(f"{folder}: no trained method found (expected {CONFIG} directly or in a method "
                                "folder of a run folder, e.g. medbridge/ or linear_probe/)")
    return found


def load_method(folder: str | Path, backbones: list[Backbone] | None = None) -> Method:
    """A saved method (a method folder or a run folder), on ``backbones`` (default: built from the saved names),
    with the backbones' fingerprints and the weights' digest checked. Files of medbridge 0.1 are read through
    ``methods/legacy.py`` into the same form."""
    from .legacy import read_legacy

    folder = method_folder(folder)
    if not (folder / CONFIG).is_file():
        meta = read_legacy(folder)
        return _build_saved(folder, meta.pop("where"), meta, meta.pop("weights"), backbones)
    where = folder / CONFIG
    meta = read_json(where, "method config")
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, *OLD_FORMATS):
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise CorruptFileError(f"{where}: format {fmt!r}, expected {FORMAT!r}")
    for key in ("method", "options", "labels", "prompt_names", "focal", "backbones", "weights_sha256"):
        if key not in meta:
            raise CorruptFileError(f"{where}: field {key!r} missing"
                                   + ("; the weights cannot be checked without it: restore the file or retrain"
                                      if key == "weights_sha256" else ""))
    if meta["format"] == FORMAT:
        if meta.get("config_sha256") != config_digest(meta):
            raise CorruptFileError(f"{where}: its content (labels, options, focal views, backbones or digests) does "
                                   "not match config_sha256 recorded when it was saved: the file was edited or "
                                   "damaged; restore it or retrain")
    else:
        log.warning("%s: format %s has no digest of its labels and options (saved before they had one): they are "
                    "checked against the weights' shapes only", where, meta["format"])
    return _build_saved(folder, where, meta, folder / WEIGHTS, backbones)


def _build_saved(folder: Path, where: Path, meta: dict, weights: Path, backbones: list[Backbone] | None) -> Method:
    """A method from the fields of a saved ``adapter.json`` (``backbones``: fingerprints to check, or None for
    files that kept none; ``sources``: backbone source strings, default the fingerprints' names)."""
    check_labels(str(where), meta["labels"], meta["prompt_names"])
    checked = meta["backbones"] is not None
    kinds = {"method": str, "options": dict, **({"backbones": list} if checked else {}), "info": dict}
    wrong = [k for k, t in kinds.items() if k in meta and not isinstance(meta[k], t)]
    if wrong:
        raise CorruptFileError(f"{where}: field(s) {wrong} of the wrong type (expected "
                               f"{', '.join(kinds[k].__name__ for k in wrong)})")
    entry = get_method(meta["method"])
    if checked and (not meta["backbones"] or not all(isinstance(fp, dict) and isinstance(fp.get("name"), str)
                                                     for fp in meta["backbones"])):
        raise CorruptFileError(f"{where}: backbones must be one or more fingerprints with a name")
    bbs = backbones or [create_backbone(s) for s in meta.get("sources") or [fp["name"] for fp in meta["backbones"]]]
    if checked:
        check_backbones(folder, meta["backbones"], bbs)
    opts = entry.method_class.check_options(meta["options"], f"{where}: options")
    tensors = load_tensors(weights, meta["weights_sha256"])
    size = meta.get("ensemble", 1)
    members_saved = 1 + max((int(n[6:].split(".")[0]) for n in tensors
                             if n.startswith("member") and n[6:].split(".")[0].isdigit()), default=0)
    if type(size) is not int or size < 1 or (size > 1 and size != members_saved):
        raise CorruptFileError(f"{where}: ensemble {size!r}, expected a number of members >= 1 (the weights hold "
                               f"{members_saved})")
    try:
        focal = FocalConfig.from_dict(meta["focal"], f"{where}: focal")
    except ValueError as exc:
        raise CorruptFileError(str(exc)) from exc
    members = [entry.method_class.build(opts, bbs, meta["labels"], meta["prompt_names"], focal) for _ in range(size)]
    method = SeedEnsemble(members) if size > 1 else members[0]
    try:
        method.restore_info(meta.get("info", {}))
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise CorruptFileError(f"{where}: field 'info' does not fit a {entry.name} ({type(exc).__name__})") from exc
    method.load_state_tensors(tensors, str(weights))
    return method.eval()


__all__ = ["AdapterMismatchError", "MethodEntry", "check_method_options", "create_method", "get_method",
           "list_methods", "load_method", "method_folder", "method_groups", "model_run_folder", "probe_method",
           "register_method", "saved_method_in", "save_method"]
