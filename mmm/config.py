"""Config helpers shared by the entry points: plain containers and the one config check.

Each config section has a dataclass next to the code that consumes it (`SequenceConfig` in
`mmm.data.sequences`, `OptimConfig` in `mmm.training.module`, ...). `check_section` turns the
section's mapping into that dataclass: unknown keys are refused naming the closest valid key,
missing keys and wrong types (read from the annotations) are refused naming the key, ranges
come from each field's metadata (`at_least`, `within`, `interval`) and rules between fields
from the dataclass's own `check()`. The YAML under configs/ holds the defaults: a field without
a default is a key every config must give.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")


def _slug(path: str) -> str:
    """A store name for a folder: readable basename + hash of the absolute path."""
    import hashlib
    import re
    from pathlib import Path

    resolved = Path(path).expanduser().resolve()
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", resolved.name) or "root"
    return f"folder-{base}-{hashlib.sha1(str(resolved).encode()).hexdigest()[:6]}"


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("mmm.slug"):
        OmegaConf.register_new_resolver("mmm.slug", _slug)


register_resolvers()


def plain(cfg: Any) -> Any:
    """OmegaConf containers -> plain python (resolved); anything else unchanged."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def require_keys(where: str, cfg: Mapping, allowed: Iterable[str], required: Iterable[str] | None = None) -> None:
    """Fail on unknown keys (naming the closest allowed key) and on missing required keys."""
    allowed = set(allowed)
    unknown = sorted(set(cfg) - allowed, key=str)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hints.append(f"{where}.{key}" + (f" (did you mean {where}.{close[0]}?)" if close else ""))
        raise ValueError(f"unknown config key(s): {', '.join(hints)}. Allowed: {', '.join(sorted(allowed))}")
    missing = sorted(set(allowed if required is None else required) - set(cfg))
    if missing:
        raise ValueError(f"missing config key(s): {', '.join(f'{where}.{k}' for k in missing)}")


# ----------------------------------------------------------------------------- typed sections


def at_least(low: float) -> dict:
    """Field metadata: a number >= low (None passes when the type allows it)."""
    return {"min": low}


def within(low: float, high: float) -> dict:
    """Field metadata: a number in [low, high]."""
    return {"min": low, "max": high}


def interval(low: float = 0.0, high: float = 1.0) -> dict:
    """Field metadata: a pair [a, b] with low <= a <= b <= high (a range a value is drawn from)."""
    return {"interval": (low, high)}


def check_section(where: str, cfg: Any, schema: type[T]) -> T:
    """The section `cfg` (a mapping or OmegaConf node) as a `schema` instance, or a ValueError
    naming `where.key`, what was wrong and what is allowed. An instance passes through."""
    if isinstance(cfg, schema):
        return cfg
    values = plain(cfg)
    if not isinstance(values, Mapping):
        raise ValueError(f"{where}: expected a mapping of keys, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    required = [
        n for n, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    require_keys(where, values, fields, required)
    hints = typing.get_type_hints(schema)
    values = {k: plain(v) for k, v in values.items()}  # a dict may still hold OmegaConf nodes
    for name, value in values.items():
        if dataclasses.is_dataclass(hints[name]):  # a nested section
            values[name] = check_section(f"{where}.{name}", value, hints[name])
    section = schema(**values)
    check_fields(section, where)
    check = getattr(section, "check", None)
    if check is not None:
        try:
            check()
        except ValueError as e:  # the dataclass names its keys; the section's place goes in front
            raise ValueError(f"{where}.{e}") from None
    return section


def check_fields(section: Any, where: str = "") -> None:
    """Each field of a dataclass instance against its annotation and metadata (what
    `check_section` does after building it; also for instances made in code)."""
    prefix = f"{where}." if where else ""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            check_fields(value, f"{prefix}{f.name}")
        else:
            _check_value(f"{prefix}{f.name}", value, hints[f.name], f.metadata)


def _type_name(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(kind))
    if origin is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(kind)))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(kind) if a is not Ellipsis]
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string"}.get(
        kind, getattr(kind, "__name__", str(kind))
    )


def _matches(value: Any, kind: Any) -> bool:
    if kind is Any:
        return True
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(kind))
    if origin is Literal:
        return value in typing.get_args(kind)
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:  # an integer is a number too (YAML writes 1 for 1.0)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple) or kind in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(kind)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is dict or kind is dict or origin is Mapping:
        return isinstance(value, Mapping)
    return isinstance(value, kind)


def check_value(key: str, value: Any, kind: Any, metadata: Mapping) -> None:
    """One key outside any schema (e.g. `trainer.max_steps`, Lightning's own section)."""
    _check_value(key, value, kind, metadata)


def _check_value(key: str, value: Any, kind: Any, metadata: Mapping) -> None:
    if not _matches(value, kind):
        raise ValueError(f"{key}={value!r}: expected {_type_name(kind)}")
    if value is None:
        return
    low, high = metadata.get("min"), metadata.get("max")
    if (low is not None and value < low) or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{key}={value!r}: expected a value {bound}")
    if "interval" in metadata:
        low, high = metadata["interval"]
        if not (len(value) == 2 and low <= value[0] <= value[1] <= high):
            raise ValueError(f"{key}={list(value)}: expected [a, b] with {low} <= a <= b <= {high}")
