"""How to steer: one small map family per method, all applied as x' = x + s * (T(x) - x).

Every map is fitted from source (S) and target (T) activations of shape (N, D), where D is the
channel / hidden axis, and exposes `delta(x) = T(x) - x` for x of shape (..., D). Maps are
stored as named tensors so a `Steering` can save them to safetensors without pickle. Each family
registers its method name(s) (core/registry.py) and says which of the run-time forms its delta
takes (`delta_form`): a constant shift, `alpha + slope * clamp(x, lo, hi)`, or `alpha + slope * x`
inside [lo, hi] and 0 outside. How a fitted map is applied (not what was fitted) comes from the
steering's config: a family names the config fields it reads in `run_options`, and `configured`
gives the map that applies them.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass, fields
from typing import ClassVar

import torch

from .linear_probe import fit_logistic_regression
from .registry import MAPS, map_class, register_map  # noqa: F401  (MAPS and map_class re-exported)


@dataclass
class SteeringMap:
    """Base class: subclasses are dataclasses whose fields are all tensors of shape (D,)."""

    method: ClassVar[str]
    # True: `fit` gives the identity, the start of training through the model (core/learned.py)
    learned: ClassVar[bool] = False
    # SteeringConfig fields that say how this family's maps are applied: init-only arguments of the
    # class (not tensors, so not saved with them), carried by `to` and `scaled`, set by `configured`
    run_options: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def fit(cls, source: torch.Tensor, target: torch.Tensor, **options) -> "SteeringMap":
        raise NotImplementedError

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scaled(self, factor: float) -> "SteeringMap":
        """The map of the same family whose delta is `factor * delta` (used to weigh a layer by its
        gate's accuracy, so the run time pays nothing for it)."""
        raise NotImplementedError

    def delta_form(self) -> tuple:
        """`("shift", shift)` for delta(x) = shift, `("affine", alpha, slope, lo, hi)` for
        delta(x) = alpha + slope * clamp(x, lo, hi), lo / hi None when unbounded, or
        `("affine_inside", alpha, slope, lo, hi)` for delta(x) = alpha + slope * x where
        lo <= x <= hi and 0 elsewhere: the forms the fused run-time op computes."""
        raise NotImplementedError

    def options(self) -> dict:
        """The values of this map's `run_options`."""
        return {name: getattr(self, name) for name in self.run_options}

    def configured(self, config) -> "SteeringMap":
        """This map applied as `config` (a SteeringConfig) says: itself when it already is."""
        wanted = {name: getattr(config, name) for name in self.run_options}
        return self if wanted == self.options() else type(self)(**self.tensors(), **wanted)

    @property
    def width(self) -> int:
        return getattr(self, fields(self)[0].name).shape[-1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # fields whose values may be an infinity of one sign (an unbounded range), by field name
    infinities: ClassVar[dict[str, float]] = {}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], width: int | None = None,
                     layer: str | None = None) -> "SteeringMap":
        """A map read back from a file, accepted only as a fit writes it: exactly this map's
        tensors, floating, of shape (width,), finite (except `infinities`); returned in float32."""
        where = f"layer {layer!r}: " if layer is not None else ""
        fix = "the steering file is damaged or was written by another tool: fit and save the steering again"
        expected = {f.name for f in fields(cls)}
        if set(tensors) != expected:
            raise ValueError(f"{where}a {cls.method} map needs tensors {sorted(expected)}, the file holds "
                             f"{sorted(tensors)}; {fix}")
        checked = {}
        for name in sorted(expected):
            t = tensors[name]
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(f"{where}map tensor {name!r} must be floating point, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)}; {fix}")
            if t.dim() != 1 or (width is not None and t.shape[0] != width):
                want = f"({width},)" if width is not None else "(width,)"
                raise ValueError(f"{where}map tensor {name!r} must have shape {want}, got {tuple(t.shape)}; {fix}")
            t = t.to(torch.float32)
            allowed = cls.infinities.get(name)
            bad = ~torch.isfinite(t)
            if allowed is not None:
                bad &= t != allowed
            if bad.any():
                kind = "NaN" if t.isnan().any() else "an infinite value"
                raise ValueError(f"{where}map tensor {name!r} holds {kind}; {fix}")
            checked[name] = t
        widths = {t.shape[0] for t in checked.values()}
        if len(widths) > 1:
            raise ValueError(f"{where}the tensors of a {cls.method} map differ in width ({sorted(widths)}); {fix}")
        cls._check_values(checked, where, fix)
        return cls(**checked)

    @classmethod
    def _check_values(cls, tensors: dict[str, torch.Tensor], where: str, fix: str) -> None:
        """Relations between the tensors that every fit satisfies."""

    def to(self, device=None, dtype=None) -> "SteeringMap":
        return type(self)(**{k: v.to(device=device, dtype=dtype) for k, v in self.tensors().items()},
                          **self.options())


@register_map("mean_shift", "mean_act")
@dataclass
class MeanShift(SteeringMap):
    """CAA / ActAdd: T(x) = x + v with v = mean(T) - mean(S). Mean-AcT is the same map."""

    method: ClassVar[str] = "mean_shift"
    shift: torch.Tensor

    @classmethod
    def fit(cls, source, target, **options):
        return cls(shift=(target.double().mean(0) - source.double().mean(0)).float())

    def delta(self, x):
        return self.shift

    def scaled(self, factor):
        return self if factor == 1 else type(self)(shift=self.shift * factor)

    def delta_form(self):
        return ("shift", self.shift)


def _quantile_grid(sorted_x: torch.Tensor, n: int) -> torch.Tensor:
    """Values of the empirical quantile function of each column at n evenly spaced levels."""
    m = sorted_x.shape[0]
    if m == n:
        return sorted_x
    pos = torch.linspace(0, m - 1, n, dtype=torch.float64)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    frac = (pos - lo).unsqueeze(1)
    return sorted_x[lo] * (1 - frac) + sorted_x[hi] * frac


OUTSIDE_SOURCE_RANGE = ("clamp", "identity")


@register_map("linear_act")
@dataclass
class LinearAcT(SteeringMap):
    """Linear-AcT: per unit, the affine 1-D optimal transport map T(x) = beta * x + alpha.

    Fitted by least squares on sorted (quantile-matched) source/target pairs, on the source
    sample range [lo, hi] (unbounded when fitted with clamp_to_source_range=False). Outside that
    range (`outside_source_range`, a run option of the config): `identity` leaves the value
    untouched, as AcT does (apple/ml-act: `LinearOTHook`, quantiles q_0_100), so inputs unlike the
    fitting data (control prompts, the first token, padding) get no shift; `clamp` evaluates the
    map at the input clamped to the range, so far-off inputs get a bounded shift. Inside it the two
    agree; the range is inclusive (AcT's is open, which leaves the extreme samples themselves alone).
    """

    method: ClassVar[str] = "linear_act"
    infinities: ClassVar[dict[str, float]] = {"lo": -torch.inf, "hi": torch.inf}  # clamp_to_source_range=False
    run_options: ClassVar[tuple[str, ...]] = ("outside_source_range",)
    beta: torch.Tensor
    alpha: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    outside_source_range: InitVar[str] = "clamp"

    @classmethod
    def fit(cls, source, target, clamp_to_source_range: bool = True, outside_source_range: str = "clamp",
            **options):
        xs = source.double().sort(0).values
        yt = target.double().sort(0).values
        n = max(xs.shape[0], yt.shape[0])
        xs, yt = _quantile_grid(xs, n), _quantile_grid(yt, n)
        xm, ym = xs.mean(0), yt.mean(0)
        var = ((xs - xm) ** 2).mean(0)
        cov = ((xs - xm) * (yt - ym)).mean(0)
        flat = var <= 1e-12 * (1 + xm.abs())
        beta = torch.where(flat, torch.ones_like(var), cov / var.clamp_min(1e-300))
        alpha = ym - beta * xm
        if clamp_to_source_range:
            lo, hi = xs[0], xs[-1]
        else:
            lo = torch.full_like(xm, -torch.inf)
            hi = torch.full_like(xm, torch.inf)
        return cls(beta=beta.float(), alpha=alpha.float(), lo=lo.float(), hi=hi.float(),
                   outside_source_range=outside_source_range)

    def __post_init__(self, outside_source_range):
        if outside_source_range not in OUTSIDE_SOURCE_RANGE:
            raise ValueError(f"outside_source_range must be one of {list(OUTSIDE_SOURCE_RANGE)}, got "
                             f"{outside_source_range!r}")
        self.outside_source_range = outside_source_range
        self._slope = self.beta - 1  # once here, not once per layer call
        # whether every bound is infinite: read from the values by the first `delta_form`, which the runtime
        # calls when it attaches, outside any trace (a bool() of a tensor in a compiled hook is a graph
        # break); casts and moves (`to`) carry it over
        self._unbounded: bool | None = None

    @classmethod
    def _check_values(cls, tensors, where, fix):
        if (tensors["lo"] > tensors["hi"]).any():
            raise ValueError(f"{where}map tensor 'lo' exceeds 'hi' (the source range is empty); {fix}")

    def delta(self, x):
        if self.outside_source_range == "identity":  # the ops of fused._composite, so the two agree bit for bit
            return torch.where((x >= self.lo) & (x <= self.hi), torch.addcmul(self.alpha, self._slope, x), 0.0)
        return torch.addcmul(self.alpha, self._slope, torch.clamp(x, self.lo, self.hi))

    def scaled(self, factor):
        if factor == 1:
            return self
        return type(self)(beta=1 + factor * self._slope, alpha=self.alpha * factor, lo=self.lo, hi=self.hi,
                          **self.options())

    def to(self, device=None, dtype=None) -> "LinearAcT":
        moved = super().to(device, dtype)
        # a cast can turn large finite bounds into infinities (fp16), never the reverse: the
        # original's answer holds for the copy, and clamping at an infinite bound changes nothing
        moved._unbounded = self._unbounded
        return moved

    def delta_form(self):
        if self._unbounded is None:
            self._unbounded = _all_infinite(self.lo, self.hi)
        if self._unbounded:  # unbounded: the options agree
            return ("affine", self.alpha, self._slope, None, None)
        form = "affine_inside" if self.outside_source_range == "identity" else "affine"
        return (form, self.alpha, self._slope, self.lo, self.hi)


def _all_infinite(lo: torch.Tensor, hi: torch.Tensor) -> bool:
    """Fitted with clamp_to_source_range=False: no bound anywhere, so there is nothing to clamp."""
    return bool(torch.isinf(lo).all() and torch.isinf(hi).all())


@register_map("lineas")
@dataclass
class LinEAS(SteeringMap):
    """LinEAS: per unit T(z) = weight * z + bias, every layer's map learned jointly through the
    model (core/learned.py). `fit` gives the identity, where that training starts (as the authors'
    code does); the map is applied at every position, unclamped."""

    method: ClassVar[str] = "lineas"
    learned: ClassVar[bool] = True
    weight: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def fit(cls, source, target, **options):
        return cls.identity(source.shape[1])

    @classmethod
    def identity(cls, width: int) -> "LinEAS":
        return cls(weight=torch.ones(width), bias=torch.zeros(width))

    def __post_init__(self):
        self._slope = self.weight - 1

    def delta(self, x):
        return torch.addcmul(self.bias, self._slope, x)

    def scaled(self, factor):
        return self if factor == 1 else type(self)(weight=1 + factor * self._slope, bias=self.bias * factor)

    def delta_form(self):
        return ("affine", self.bias, self._slope, None, None)


@register_map("iti")
@dataclass
class ITIC(SteeringMap):
    """ITI-C: T(x) = x + sigma * theta, theta the unit normal of a logistic probe S -> T."""

    method: ClassVar[str] = "iti"
    shift: torch.Tensor

    @classmethod
    def fit(cls, source, target, logistic_l2: float = 1.0, **options):
        x = torch.cat([source, target]).double()
        y = torch.cat([torch.zeros(len(source)), torch.ones(len(target))])
        center = x.mean(0)
        scale = x.std(0).clamp_min(1e-8)
        w, _ = fit_logistic_regression((x - center) / scale, y, l2=logistic_l2)
        theta = w / scale
        norm = theta.norm()
        if norm == 0:
            raise ValueError("ITI-C found no direction separating source from target activations; "
                             "check that the source and target sets differ")
        theta = theta / norm
        sigma = (x @ theta).std()
        return cls(shift=(sigma * theta).float())

    def delta(self, x):
        return self.shift

    def scaled(self, factor):
        return self if factor == 1 else type(self)(shift=self.shift * factor)

    def delta_form(self):
        return ("shift", self.shift)
