"""Dotted-key overrides of a run config: `train.steps=2`, `sglang.student.url=http://127.0.0.1:30000`.

    cfg = apply_overrides(recipe(), ["train.steps=2", "parallel.tp=1", "sglang.teacher=default"])

Values are parsed by the type of the field they set: int, float, bool (true/false/1/0/yes/no), str, None (`none`,
`null`), tuples (comma-separated, or a JSON list), Literal choices (checked). A field typed `SomeConfig | None` is set
to None with `none` and to a default `SomeConfig` with `default` (the parent's `OVERRIDE_DEFAULTS[field]()` when it
defines one, else `SomeConfig()`); its sub-fields can then be set with further keys.
Overrides are applied together: each one copies the path from the root to its field, and once all are in place
every Config's `__post_init__` validation runs again, innermost first, so settings that only make sense together
(`teacher_source=sglang sglang.teacher=default objective.teacher_signal=top_k`) can be given in any order. An unknown
key is an error naming the valid keys at that level.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from typing import Any, Literal

_NONE = {"none", "null"}
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _optional(kind: Any) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind)


def parse_value(kind: Any, text: str, key: str) -> Any:
    """Parse `text` as a value of type `kind` (a field's annotation). Raises ValueError naming `key`."""
    low = text.strip().lower()
    if _optional(kind) and low in _NONE:
        return None
    if _optional(kind):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    origin = typing.get_origin(kind)
    try:
        if origin is Literal:
            choices = typing.get_args(kind)
            value = next((c for c in choices if str(c) == text), None)
            if value is None:
                raise ValueError(f"must be one of {list(choices)}")
            return value
        if dataclasses.is_dataclass(kind):
            if low == "default":
                return kind()
            raise ValueError(f"set it to 'default' (or 'none'), then its fields with {key}.FIELD=VALUE")
        if kind is bool:
            if low in _TRUE | _FALSE:
                return low in _TRUE
            raise ValueError("must be true or false")
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return text
        if origin is tuple:
            args = typing.get_args(kind)
            item = args[0] if args else str
            items = json.loads(text) if text.strip().startswith("[") else [s for s in text.split(",") if s.strip()]
            return tuple(parse_value(item, str(s).strip(), key) for s in items)
    except ValueError as e:
        raise ValueError(f"override {key}={text!r}: {e}") from None
    raise ValueError(f"override {key}: fields of type {kind} cannot be set from the command line")


def _set(obj: Any, path: list[str], text: str, full_key: str) -> Any:
    cls = type(obj)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    name = path[0]
    if name not in fields:
        where = full_key[: len(full_key) - len(".".join(path))].rstrip(".") or "the run config"
        raise ValueError(f"unknown override key {full_key!r}: {where} has no field {name!r} (fields: {sorted(fields)})")
    kind = typing.get_type_hints(cls)[name]
    if len(path) == 1:
        factory = getattr(cls, "OVERRIDE_DEFAULTS", {}).get(name)
        if factory is not None and text.strip().lower() == "default":
            value = factory()
        else:
            value = parse_value(kind, text, full_key)
    else:
        current = getattr(obj, name)
        if current is None:
            raise ValueError(
                f"override {full_key}: {'.'.join(full_key.split('.')[: -len(path) + 1])} is None; set it first with"
                f" {'.'.join(full_key.split('.')[: -len(path) + 1])}=default"
            )
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"override {full_key}: {name!r} is a {type(current).__name__}, not a config section")
        value = _set(current, path[1:], text, full_key)
    new = copy.copy(obj)  # validated later, with every override in place
    object.__setattr__(new, name, value)
    return new


def validate(cfg: Any) -> None:
    """Run `__post_init__` of every nested dataclass, innermost first (raises the first ValueError)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            validate(value)
    post_init = getattr(cfg, "__post_init__", None)
    if post_init is not None:
        post_init()


def apply_overrides(cfg: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    """Return a copy of the dataclass `cfg` with every `dotted.key=value` applied (in order), then validated."""
    if not overrides:
        return cfg
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not KEY=VALUE (e.g. train.steps=2)")
        cfg = _set(cfg, key.strip().split("."), text, key.strip())
    validate(cfg)
    return cfg


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a (nested) dataclass as {dotted.key: value}: what `apply_overrides` can set."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key + "."))
        else:
            out[key] = value
    return out
