"""Config fields with help text and declarative ranges, their validation, and the CLI/YAML coercion.

The stage configs (ppomax.config) declare every field with :func:`opt`; ``__post_init__`` calls
:func:`validate_fields`, so a bad value fails before any model is loaded with a message naming
the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field
from typing import Any

from ppomax.errors import UserError

_MISSING = dataclasses.MISSING


class ConfigError(UserError, ValueError):
    """A config value is invalid; the message names the field, the value and what is allowed."""


def opt(
    default: Any = _MISSING,
    help: str = "",
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple | None = None,
    required: bool = False,
) -> Any:
    """A dataclass field with help text and a declarative allowed range."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "required": required}
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def allowed_values(meta: dict) -> str:
    """The allowed values of a field (its ``opt`` metadata) as text: "one of ...", ">= 0, < 1"."""
    parts = []
    if meta.get("choices"):
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    if meta.get("ge") is not None:
        parts.append(f">= {meta['ge']}")
    if meta.get("gt") is not None:
        parts.append(f"> {meta['gt']}")
    if meta.get("le") is not None:
        parts.append(f"<= {meta['le']}")
    if meta.get("lt") is not None:
        parts.append(f"< {meta['lt']}")
    return " and ".join(parts)


def validate_fields(cfg: Any) -> None:
    """Check every field against its declared range; raise ConfigError naming the field."""
    name = type(cfg).__name__
    for f in dataclasses.fields(cfg):
        meta, value = f.metadata, getattr(cfg, f.name)
        if meta.get("required") and (value is None or value == ""):
            raise ConfigError(f"{name}.{f.name} is required (flag --{f.name})")
        if value is None:
            continue
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f"{name}.{f.name} = {value!r} is invalid: allowed {allowed_values(meta)}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if isinstance(value, float) and math.isnan(value):
            raise ConfigError(f"{name}.{f.name} = nan is invalid: allowed {allowed_values(meta) or 'a number'}")
        bad = (
            (meta.get("ge") is not None and value < meta["ge"])
            or (meta.get("gt") is not None and value <= meta["gt"])
            or (meta.get("le") is not None and value > meta["le"])
            or (meta.get("lt") is not None and value >= meta["lt"])
        )
        if bad:
            raise ConfigError(f"{name}.{f.name} = {value!r} is out of range: allowed {allowed_values(meta)}")


def check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


# Type helpers used by the CLI / YAML layer


def field_base_type(cls: type, name: str) -> tuple[type, bool]:
    """(base type, optional?) of a dataclass field, resolving ``X | None`` annotations."""
    hints = typing.get_type_hints(cls)
    tp = hints[name]
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
    return tp, optional


def coerce(cls: type, name: str, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ConfigError naming the field."""
    tp, optional = field_base_type(cls, name)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{cls.__name__}.{name} may not be None")
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:  # a YAML list of strings (report_to, lora_target_modules) is a comma-separated value
            return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{cls.__name__}.{name} = {value!r} is not a valid {tp.__name__}") from None
    return value
