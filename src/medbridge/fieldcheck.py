"""Strict type checks of config values against dataclass field annotations (the config sections and every method's
options class), with one-line errors that name the key, the value and what is allowed.

Annotations are read as the strings ``from __future__ import annotations`` leaves (``"int"``, ``"str | None"``,
``"int | dict"``, ``"list"``, ``"Any"``). Text given for a number or a boolean (YAML 1.1 reads ``1e-3`` as text;
``--set`` values may be quoted) is cast; everything else must already have the field's type. Floats must be
finite; whole-number floats (``1e3``) are accepted for integer fields."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_WHAT = {"int": "a whole number", "float": "a finite number", "bool": "true or false", "str": "text",
         "None": "null", "dict": "a mapping {key: value}", "list": "a list [a, b, ...]"}


class FieldTypeError(ValueError):
    """A value does not have its field's type; the message names the key, the value and the allowed type."""


def _one(kind: str, value: Any) -> tuple[bool, Any]:
    """(ok, converted value) for one member of an annotation's union."""
    if kind in ("Any", "object"):
        return True, value
    if kind == "None":
        return value is None, value
    if kind == "bool":
        if isinstance(value, bool):
            return True, value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return True, value.strip().lower() in _TRUE
        return False, value
    if isinstance(value, bool):  # bool is an int subclass: never a number here
        return False, value
    if kind == "int":
        if isinstance(value, str):
            try:
                value = float(value.strip()) if any(c in value for c in ".eE") else int(value.strip())
            except ValueError:
                return False, value
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            return True, int(value)
        return isinstance(value, int), value
    if kind == "float":
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                return False, value
        if isinstance(value, (int, float)) and math.isfinite(value):
            return True, float(value)
        return False, value
    if kind == "str":
        if isinstance(value, (int, float)) and not (isinstance(value, float) and not math.isfinite(value)):
            return True, str(value)  # a folder or device named by a number (YAML reads 2024 as an int)
        return isinstance(value, str), value
    base = kind.split("[", 1)[0].strip()
    if base in ("dict", "Mapping"):
        return isinstance(value, dict), value
    if base in ("list", "tuple", "Sequence"):
        return isinstance(value, (list, tuple)), list(value) if isinstance(value, tuple) else value
    return True, value  # an annotation this checker does not know (a plugin's own class): the dataclass decides


def allowed_text(annotation: str) -> str:
    """Human wording of an annotation: ``int | None`` -> ``a whole number or null``."""
    return " or ".join(_WHAT.get(k.strip().split("[", 1)[0], k.strip()) for k in str(annotation).split("|"))


def check_value(key: str, value: Any, annotation: Any) -> Any:
    """``value`` converted to the field's type, or :class:`FieldTypeError` naming ``key``."""
    annotation = getattr(annotation, "__name__", annotation) if isinstance(annotation, type) else annotation
    kinds = [k.strip() for k in str(annotation).replace("Optional[", "None | ").rstrip("]").split("|")]
    if value is None and "None" not in kinds and "Any" not in kinds:
        raise FieldTypeError(f"{key}: got null; expected {allowed_text(annotation)}")
    for kind in sorted(kinds, key=lambda k: k == "str"):  # numbers before text: "int | str" keeps 0 an int
        ok, converted = _one(kind, value)
        if ok:
            return converted
    raise FieldTypeError(f"{key}: {value!r} is not {allowed_text(annotation)}")


def check_fields(cls: type, values: dict, where: str, skip: tuple[str, ...] = ()) -> dict:
    """``values`` for the dataclass ``cls`` with every known field type-checked (unknown keys are left for the
    caller's unknown-key error)."""
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    return {k: check_value(f"{where}.{k}" if where else k, v, types[k]) if k in types and k not in skip else v
            for k, v in values.items()}


__all__ = ["FieldTypeError", "allowed_text", "check_fields", "check_value"]
