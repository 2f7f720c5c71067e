"""Fields with a fixed set of values are typed `Literal[...]`; `check_choices` validates them from that type.

    @dataclass(kw_only=True, slots=True)
    class Config:
        detector: Literal["none", "window_ot", "lookahead"] = "window_ot"

        def __post_init__(self) -> None:
            check_choices(self, "detection")        # ValueError: detection.detector must be one of [...], got 'x'

The choices live in the annotation only: the command line (`topd_megatron.overrides`) parses and checks the same
`Literal`, and documentation that lists them reads them from there.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Literal


def literal_choices(kind: Any) -> tuple[Any, ...] | None:
    """The allowed values of a `Literal[...]` (or `Literal[...] | None`, None included) annotation, else None."""
    if typing.get_origin(kind) is Literal:
        return typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = typing.get_args(kind)
        literals = [a for a in args if typing.get_origin(a) is Literal]
        if len(literals) == 1 and all(a is type(None) or a is literals[0] for a in args):
            return (*typing.get_args(literals[0]), None)
    return None


@functools.cache
def _choice_fields(cls: type) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        choices = literal_choices(hints[f.name])
        if choices is not None:
            out.append((f.name, choices))
    return tuple(out)


def check_choices(cfg: Any, section: str = "") -> None:
    """Raise ValueError naming the field and its allowed values when a Literal-typed field holds anything else."""
    for name, choices in _choice_fields(type(cfg)):
        value = getattr(cfg, name)
        if value not in choices:
            key = f"{section}.{name}" if section else name
            shown = ", ".join(repr(c) for c in choices)
            raise ValueError(f"{key} must be one of {shown}, got {value!r}")
