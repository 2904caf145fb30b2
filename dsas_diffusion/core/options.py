"""Run-time options of an attached steering, checked once where they enter (an `attach()` call, a
pipeline call, an assignment to a handle), so a bad value never reaches a hook as NaN or garbage.

Each check names the argument as the caller spelled it (`strength`, `steering_strength`), the
value, and what to pass instead.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from .config import GATINGS, Gating

if TYPE_CHECKING:
    from .config import SteeringConfig

MAX_STRENGTH = 1000.0
_STRENGTH_WHY = (
    "alpha multiplies the fitted shift (1 applies it once; sweeps use values up to a few), and at 1000 shifts "
    "the activations are far outside anything the model has seen and overflow half precision (max 65504) "
    "into inf, which gives NaN outputs and black images"
)


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_bool(value: Any, name: str) -> bool:
    """Booleans only: 0 / 1 and "false" are refused, since "false" is truthy and would mean True."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_describe(value)}")
    return value


def _real(value: Any, name: str, example: str) -> float:
    """A Python / numpy real, or a one-element tensor or array, as a float; booleans are refused."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        raise TypeError(f"{name} must be a number such as {example}, got the boolean {value!r}")
    if not isinstance(value, numbers.Real) and hasattr(value, "shape") and hasattr(value, "item"):  # tensor, array
        size = math.prod(value.shape)
        if size != 1:
            raise TypeError(f"{name} must be one number such as {example}, got a {type(value).__name__} of shape "
                            f"{tuple(value.shape)}; pass a single number")
        if "bool" in str(value.dtype) or "complex" in str(value.dtype):
            raise TypeError(f"{name} must be a real number such as {example}, got a {type(value).__name__} of "
                            f"dtype {value.dtype}")
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number such as {example}, got {_describe(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number such as {example}, got {value!r}")
    return value


def check_strength(value: Any, name: str = "strength") -> float:
    """A finite real with |value| <= MAX_STRENGTH (negative values steer towards the source concept)."""
    value = _real(value, name, "1.0")
    if abs(value) > MAX_STRENGTH:
        raise ValueError(f"{name}={value!r} is out of range: |{name}| must be at most {MAX_STRENGTH:g}, because "
                         f"{_STRENGTH_WHY}. Pass a strength between 0 and a few (0 turns the steering off)")
    return value


def check_gating(value: Any, name: str = "gating") -> Gating:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {list(GATINGS)} (a string), got {_describe(value)}")
    if value not in GATINGS:
        raise ValueError(f"{name}={value!r} is unknown; choose one of {list(GATINGS)}")
    return value  # type: ignore[return-value]


def check_lambda_floor(value: Any, name: str = "lambda_floor") -> float:
    value = _real(value, name, "0.1")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {value!r}: lambdas below it snap to 0, so 0 keeps every "
                         "lambda and 1 or more would switch the steering off everywhere")
    return value


def check_layers(value: Any, name: str = "layers") -> list[str] | None:
    """None (the default layers) or a non-empty list / tuple of layer names."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of layer names such as ['blocks.0'] (or None for the default), "
                        f"got {_describe(value)}")
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{name} must hold layer names (strings), got {_describe(bad[0])} in {value!r}")
    if not value:
        raise ValueError(f"{name}=[] selects no layer, so nothing would be steered; pass None for the default layers "
                         "or name some, e.g. steering.layers[:1]")
    return list(value)


_CHECKS = {
    "strength": check_strength,
    "gated": check_bool,
    "gating": check_gating,
    "lambda_floor": check_lambda_floor,
    "skip_first_token": check_bool,
    "record_scales": check_bool,
}


@dataclass(frozen=True)
class RunOptions:
    """How an attached steering runs: strength alpha, gated (False: plain steering, lambda = 1),
    the gating mode, the lambda floor, whether the first token is skipped, whether lambdas are
    recorded. Every field is checked when the object is made, so holding one means the values
    are valid; `replace()` gives a checked copy. The steering's config is never modified."""

    strength: float = 1.0
    gated: bool = True
    gating: Gating = "token"
    lambda_floor: float = 0.0
    skip_first_token: bool = True
    record_scales: bool = True

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _CHECKS[f.name](getattr(self, f.name), f.name))

    @classmethod
    def from_config(cls, config: "SteeringConfig", **overrides: Any) -> "RunOptions":
        """The config's run-time defaults (gating, lambda_floor, skip_first_token) with `overrides`;
        an override of None keeps the default. Unknown names are a TypeError listing the known ones."""
        check_option_names(overrides, cls.names(), "run option")
        defaults = {"gating": config.gating, "lambda_floor": config.lambda_floor,
                    "skip_first_token": config.skip_first_token}
        given = {k: v for k, v in overrides.items() if v is not None or k not in defaults}
        return cls(**{**defaults, **given})

    @staticmethod
    def names() -> tuple[str, ...]:
        return tuple(_CHECKS)

    def as_kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> "RunOptions":
        check_option_names(changes, self.names(), "run option")
        return dataclasses.replace(self, **changes)


def check_option_names(given: dict, known, what: str = "option") -> None:
    """A TypeError naming each unknown keyword, the closest known one, and the full list."""
    unknown = sorted(set(given) - set(known))
    if not unknown:
        return
    import difflib

    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, list(known), n=1) or [k for k in known if name in k or k in name][:1]
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise TypeError(f"unknown {what}{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
                    f"the known ones are {sorted(known)}")


class _CheckedOption:
    """One run option as a handle attribute, checked on assignment with its entry in `_CHECKS`.
    The value lives in the plain attribute `_<name>`, which hooks read directly."""

    def __set_name__(self, owner, name: str) -> None:
        self.name, self.private, self.check = name, f"_{name}", _CHECKS[name]

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(obj, self.private)

    def __set__(self, obj, value) -> None:
        setattr(obj, self.private, self.check(value, self.name))
        obj._options_changed()


class RunOptionAttributes:
    """The run options of a handle as attributes that can be changed between calls
    (`handle.strength = 0.5`), each checked when assigned. Values live in plain private
    attributes, so a hook reads them at the cost of an attribute lookup."""

    strength = _CheckedOption()
    gated = _CheckedOption()
    gating = _CheckedOption()
    lambda_floor = _CheckedOption()
    skip_first_token = _CheckedOption()
    record_scales = _CheckedOption()

    @property
    def options(self) -> RunOptions:
        return RunOptions(**{name: getattr(self, f"_{name}") for name in _CHECKS})

    @options.setter
    def options(self, value: RunOptions) -> None:
        if not isinstance(value, RunOptions):
            raise TypeError(f"options must be a RunOptions, got {_describe(value)}")
        for name in _CHECKS:  # a RunOptions holds checked values already
            setattr(self, f"_{name}", getattr(value, name))
        self._options_changed()

    def _options_changed(self) -> None:
        """Called after any option changes: a subclass keeps derived state (a tensor of the strength) here."""
