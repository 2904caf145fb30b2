"""Open sets of map families (how to steer) and gate kinds (when): one file plus a registration each.

A map family is a `SteeringMap` subclass registered under its method name(s) with `@register_map`;
a gate kind is a name plus, for gates fitted from pooled activations, their fit function
(`register_gate`). Configs, fits, loading and the CLI's `--method` choices read these tables, so
adding a family touches no other file. Built-in families register in core/maps.py, gate kinds
in core/gate.py (two-stage) and core/learned.py (end to end).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .gate import Gate
    from .maps import SteeringMap

M = TypeVar("M", bound="type[SteeringMap]")

MAPS: dict[str, type["SteeringMap"]] = {}


@dataclass(frozen=True)
class GateKind:
    """How gates are obtained: `fit(source, control, **options) -> Gate` from pooled activations,
    or None when they are learned through the model together with the maps."""

    name: str
    fit: Callable[..., "Gate"] | None
    summary: str


GATE_KINDS: dict[str, GateKind] = {}


def register_map(*names: str) -> Callable[[M], M]:
    """Class decorator: `@register_map("name")` makes a `SteeringMap` subclass the family of
    `method="name"` (several names may share one class). A name already taken is refused."""
    if not names or not all(isinstance(n, str) and n.isidentifier() for n in names):
        raise ValueError(f"register_map needs method names that are identifiers, e.g. 'mean_shift'; got {names!r}")

    def register(cls: M) -> M:
        for name in names:
            if MAPS.get(name, cls) is not cls:
                raise ValueError(f"method {name!r} is already registered to {MAPS[name].__name__}; choose another name")
            MAPS[name] = cls
        return cls

    return register


def register_gate(name: str, fit: Callable[..., "Gate"] | None, summary: str) -> GateKind:
    if name in GATE_KINDS:
        raise ValueError(f"gate kind {name!r} is already registered; choose another name")
    GATE_KINDS[name] = GateKind(name, fit, summary)
    return GATE_KINDS[name]


def map_class(method: str) -> type["SteeringMap"]:
    try:
        return MAPS[method]
    except (KeyError, TypeError):
        raise ValueError(f"unknown steering method {method!r}; choose one of {methods()}") from None


def methods() -> list[str]:
    """The registered method names, sorted: the choices of every `method=` and of the CLI's `--method`."""
    return sorted(MAPS)


def gate_kinds() -> list[str]:
    """The registered gate kinds, sorted: the choices of every `gates=`."""
    return sorted(GATE_KINDS)
