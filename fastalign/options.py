"""Config fields that say what they take: a type (the annotation), a range or a set of choices, and
a one-line help. A config checks every field when it is built (``check_fields`` in its
``__post_init__``), and ``fastalign train ALGO --help`` lists them.

    learning_rate: float = option(5e-5, "the peak learning rate, reached after the warmup", ge=0)

A field declared without ``option`` is still checked against its annotation; a subclass that only
changes a default (``learning_rate: float = 2e-5``) keeps its base's help and range.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import numbers
import operator
import types
import typing

from fastalign.errors import ConfigError

BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}
NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
         list: "a list", tuple: "a list"}


def option(default, help: str, *, choices: tuple | None = None, **bounds) -> dataclasses.Field:
    """A config field: its default (a list or dict is copied for each config), a one-line help,
    and the values it takes: ``choices``, or bounds ``ge``/``gt``/``le``/``lt`` on a number."""
    unknown = set(bounds) - set(BOUNDS)
    if unknown:
        raise TypeError(f"option() takes bounds {sorted(BOUNDS)}, not {sorted(unknown)}")
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "bounds": bounds}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.copy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Spec:
    """What one config field takes, read from its annotation and its ``option``."""

    name: str
    type: object
    label: str  # the annotation as written
    default: object
    help: str = ""
    choices: tuple | None = None
    bounds: dict = dataclasses.field(default_factory=dict)

    @property
    def optional(self) -> bool:
        return type(None) in typing.get_args(self.type)

    @property
    def constraint(self) -> str:
        """What the type alone does not say: ``"one of 'linear', 'cosine'"``, ``">= 0 and < 1"`` or ``""``."""
        if self.choices:
            return "one of " + ", ".join(map(repr, self.choices))
        return " and ".join(f"{BOUNDS[b][1]} {v}" for b, v in self.bounds.items())

    @property
    def expected(self) -> str:
        """The values the field takes, in words: ``"an integer >= 1 or null"``, ``"one of 'a', 'b'"``."""
        if self.choices:
            text = self.constraint
        else:
            kinds = [a for a in typing.get_args(self.type) if a is not type(None)] if self.optional else [self.type]
            text = " ".join(filter(None, [_join([describe(kind) for kind in kinds]), self.constraint]))
        return text + " or null" if self.optional else text

    def accepts(self, value) -> bool:
        if not fits(value, self.type):
            return False
        if value is None:
            return True
        if self.choices and value not in self.choices:
            return False
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return all(BOUNDS[b][0](value, v) for b, v in self.bounds.items())
        return True


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def describe(kind) -> str:
    """A type in words: ``"an integer"``, ``"a list of strings"``, ``"a string or a mapping"``."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return _join([describe(a) for a in args])
    if typing.get_origin(kind) in (list, tuple) and args and args[0] is str:
        return "a list of strings"
    return NAMES.get(typing.get_origin(kind) or kind, "null" if kind is type(None) else getattr(kind, "__name__", str(kind)))


def fits(value, kind) -> bool:
    """Whether ``value`` is of the annotated ``kind`` (a bool is no int, an int is a float; a number
    is finite: no config takes an infinite learning rate or a NaN coefficient)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if kind is type(None):
        return value is None
    if kind in (int, float):
        number = numbers.Integral if kind is int else numbers.Real
        return isinstance(value, number) and not isinstance(value, bool) and math.isfinite(value)
    if origin in (list, tuple):
        return isinstance(value, origin) and all(fits(v, args[0]) for v in value)
    return isinstance(value, origin or kind)


def _metadata(config_class, name: str):
    """The ``option`` metadata of a field: the config class's own, else its nearest base's."""
    for klass in config_class.__mro__:
        field = getattr(klass, "__dataclass_fields__", {}).get(name)
        if field is not None and field.metadata:
            return field.metadata
    return {}


@functools.cache
def specs(config_class) -> tuple[Spec, ...]:
    """Every field of a config dataclass, in order, with what it takes."""
    hints = typing.get_type_hints(config_class)
    out = []
    for field in dataclasses.fields(config_class):
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        label = field.type if isinstance(field.type, str) else describe(field.type)
        out.append(Spec(field.name, hints[field.name], label, default, **_metadata(config_class, field.name)))
    return tuple(out)


def check_fields(config) -> None:
    """A ``ConfigError`` naming the first field of ``config`` whose value its type or range refuses."""
    for spec in specs(type(config)):
        value = getattr(config, spec.name)
        if not spec.accepts(value):
            raise ConfigError(f"{spec.name} must be {spec.expected}, got {value!r}")
