"""One registry of dataset formats: ``register_dataset``, ``list_datasets``, ``get_dataset``, ``detect_format``,
``load_dataset``.

Registration is explicit: each loader module has a ``register()`` function beside its loader (its citation, the
files it expects, how to recognise its folder), called by ``datasets/builtin.py`` on first use of the registry;
your own formats call :func:`register_dataset` (in code or from a ``MEDBRIDGE_PLUGINS`` hook, the one plugin hook
of methods and backbones). ``--format``, ``format="auto"`` detection, the default preset of a dataset and
``medbridge list datasets`` all read this registry; nothing else names a format.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..table import DatasetError, ImageTable

#: a folder (or file) -> whether it is in this format's layout
Detector = Callable[[Path], bool]


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset format: how to load it, how to recognise it, what it expects and whom to cite."""

    name: str  # the format name of --format / data.format / load_dataset
    load: Callable[..., ImageTable]  # load(path, **options) -> ImageTable
    detect: Detector | None  # detect(path) -> bool for format="auto"; None: only when named
    citation: str = ""
    description: str = ""
    files: tuple[str, ...] = ()  # what the official download holds (shown by `medbridge list datasets`)
    priority: int = 0  # detection order: higher first, ties in registration order (the folder fallback: -100)
    preset: str | None = None  # a run on this dataset without --preset/--config uses this preset


_REGISTRY: dict[str, DatasetSpec] = {}
_BUILTINS_LOADED = False
_PLUGINS_LOADED = False


def register_dataset(name: str, load: Callable[..., ImageTable], detect: Detector | None = None,
                     citation: str = "", *, description: str = "", files: Sequence[str] = (), priority: int = 0,
                     preset: str | None = None, replace: bool = False) -> DatasetSpec:
    """Make ``load(path, **options) -> ImageTable`` available as format ``name`` to ``--format``, configs
    (``data.format``), ``load_dataset`` and, when ``detect(path)`` says so, to ``format="auto"``."""
    if not name or not isinstance(name, str) or name == "auto":
        raise ValueError(f"register_dataset: {name!r} is not a usable format name")
    if not callable(load) or (detect is not None and not callable(detect)):
        raise TypeError(f"register_dataset({name!r}): load and detect must be functions")
    _ensure_builtins()
    doc = (getattr(load, "__doc__", None) or "").strip().splitlines()
    spec = DatasetSpec(name, load, detect, citation, description or (doc[0] if doc else ""), tuple(files),
                       int(priority), preset)
    old = _REGISTRY.get(name)
    if old is not None and not replace and old != spec:
        raise ValueError(f"a dataset format named {name!r} is registered already ({old.load.__qualname__}); "
                         "pass replace=True to replace it")
    _REGISTRY[name] = spec
    return spec


def _ensure_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        from .builtin import register_builtin_datasets

        register_builtin_datasets()


def _registry() -> dict[str, DatasetSpec]:
    """The built-in formats, then those of ``$MEDBRIDGE_PLUGINS``, each loaded once."""
    global _PLUGINS_LOADED
    _ensure_builtins()
    if not _PLUGINS_LOADED and os.environ.get("MEDBRIDGE_PLUGINS", "").strip():
        _PLUGINS_LOADED = True
        from ...methods.registry import list_methods

        list_methods()  # the one plugin hook: built-in methods, then MEDBRIDGE_PLUGINS (once per process)
    return _REGISTRY


def registered_count() -> int:
    """How many formats are registered (built-ins included; a plugin hook must add something)."""
    _ensure_builtins()
    return len(_REGISTRY)


def list_datasets() -> list[str]:
    """Registered format names, in registration order."""
    return list(_registry())


def get_dataset(name: str) -> DatasetSpec:
    """The registered format ``name``; an unknown name is one line naming close matches."""
    reg = _registry()
    if name not in reg:
        close = difflib.get_close_matches(str(name), list(reg), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise DatasetError(f"unknown dataset format {name!r}{hint} (registered: {', '.join(reg)}, or auto; your own "
                           "formats: register_dataset(...) or MEDBRIDGE_PLUGINS=module:function)")
    return reg[name]


def detection_order() -> list[DatasetSpec]:
    """The formats ``format="auto"`` tries, in order (higher ``priority`` first, then registration order)."""
    specs = [s for s in _registry().values() if s.detect is not None]
    return sorted(specs, key=lambda s: -s.priority)  # sorted() is stable: ties keep registration order


def detect_format(path: str | Path) -> str:
    """Guess the layout from the files present (the official file names of each dataset)."""
    p = Path(path)
    for spec in detection_order():
        if spec.detect(p):
            return spec.name
    raise DatasetError(f"cannot tell the dataset layout of {p}: pass a format ({', '.join(_registry())})")


def load_dataset(format: str | None, path: str | Path, **options) -> ImageTable:
    """Load a dataset by format name (``None`` or ``"auto"``: detect from the files)."""
    fmt = detect_format(path) if format in (None, "auto") else format
    spec = get_dataset(fmt)
    if not Path(path).exists():
        raise DatasetError(f"{fmt}: dataset path {path} does not exist")
    try:
        return spec.load(path, **options)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise DatasetError(f"{fmt}: {exc}") from exc
        raise


def default_preset(format: str | None, path: str | Path) -> tuple[str, str] | None:
    """(format, preset) when the dataset at ``path`` (``format`` or detected) names a default preset, else None
    (also when the layout cannot be told: loading reports that later, as before)."""
    try:
        spec = get_dataset(detect_format(path) if format in (None, "auto") else format)
    except DatasetError:
        return None
    return (spec.name, spec.preset) if spec.preset else None


def has_any_file(*names: str) -> Detector:
    """A detector: the folder holds at least one of these files."""
    return lambda p: any((p / f).is_file() for f in names)


def datasets_table(as_json: bool = False) -> str:
    """``medbridge list datasets``: name, description, expected files, default preset and citation of each."""
    rows = [{"name": s.name, "description": s.description, "files": list(s.files), "preset": s.preset,
             "detected": s.detect is not None, "citation": s.citation} for s in _registry().values()]
    if as_json:
        return json.dumps(rows, indent=1)
    width = max(len(r["name"]) for r in rows)
    lines = []
    for r in rows:
        lines.append(f"{r['name'].ljust(width)}  {r['description']}")
        pad = " " * (width + 2)
        lines.append(f"{pad}files: {', '.join(r['files']) or '-'}"
                     + (f"; default preset: {r['preset']}" if r["preset"] else ""))
        if r["citation"]:
            lines.append(f"{pad}cite: {r['citation']}")
    lines.append("\n--format NAME, or auto (the default): detected from the files; "
                 "loader options with --set data.options.KEY=VALUE; add your own format with "
                 "medbridge.register_dataset (docs/adding-a-dataset.md).")
    return "\n".join(lines)


__all__ = ["DatasetSpec", "datasets_table", "default_preset", "detect_format", "detection_order", "get_dataset",
           "has_any_file", "list_datasets", "load_dataset", "register_dataset", "registered_count"]
