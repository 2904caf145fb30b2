"""The registry: a new map family is one class plus a registration, and then fits, saves, loads and
steers like the built-in ones; every family's `delta_form` (what the fused run-time op computes)
equals its `delta`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from dsas_diffusion import Steering
from dsas_diffusion.core.maps import ITIC, LinearAcT, LinEAS, MeanShift, SteeringMap
from dsas_diffusion.core.registry import MAPS, gate_kinds, map_class, methods, register_map
from tests.core.test_steering import Tiny, fitted


@dataclass
class HalfShift(SteeringMap):
    """Half the mean shift: a family defined in a test, registered below."""

    method: ClassVar[str] = "half_shift"
    shift: torch.Tensor

    @classmethod
    def fit(cls, source, target, **options):
        return cls(shift=((target.mean(0) - source.mean(0)) / 2).float())

    def delta(self, x):
        return self.shift

    def delta_form(self):
        return ("shift", self.shift)


@pytest.fixture
def registered():
    register_map("half_shift")(HalfShift)
    try:
        yield
    finally:
        del MAPS["half_shift"]


def test_a_registered_family_fits_saves_loads_and_steers(registered, tmp_path):
    assert "half_shift" in methods() and map_class("half_shift") is HalfShift
    model = Tiny()
    steering, source, _ = fitted(model, method="half_shift")
    steering.save_pretrained(tmp_path)
    loaded = Steering.from_pretrained(tmp_path)
    assert isinstance(loaded.maps["blocks.0"], HalfShift)
    with steering.attach(model) as h, torch.no_grad():
        expected = model(source)
        h.detach()
        with loaded.attach(model):
            assert torch.equal(model(source), expected)


def test_a_taken_name_or_a_bad_one_is_refused():
    with pytest.raises(ValueError, match="method 'mean_shift' is already registered to MeanShift"):
        register_map("mean_shift")(HalfShift)
    with pytest.raises(ValueError, match="method names that are identifiers"):
        register_map("half shift")
    assert "mean_shift" in methods() and MAPS["mean_shift"] is MeanShift


def test_built_in_families_and_gate_kinds():
    assert methods() == ["iti", "linear_act", "lineas", "mean_act", "mean_shift"]
    assert gate_kinds() == ["e2e", "two_stage"]


def _from_form(form, x):
    if form[0] == "shift":
        return form[1].expand_as(x)
    kind, alpha, slope, lo, hi = form
    if kind == "affine_inside":  # AcT's identity outside the source range
        return torch.where((x >= lo) & (x <= hi), torch.addcmul(alpha, slope, x), torch.zeros_like(x))
    return torch.addcmul(alpha, slope, x if lo is None else torch.clamp(x, lo, hi))


@pytest.mark.parametrize("m", [
    MeanShift(shift=torch.linspace(-1, 1, 6)),
    ITIC(shift=torch.linspace(0, 1, 6)),
    LinearAcT.fit(torch.randn(50, 6), torch.randn(40, 6) * 2 + 1),
    LinearAcT.fit(torch.randn(50, 6), torch.randn(40, 6) * 2 + 1, clamp_to_source_range=False),
    LinearAcT(**LinearAcT.fit(torch.randn(50, 6), torch.randn(40, 6) * 2 + 1).tensors(),
              outside_source_range="identity"),
    LinEAS(weight=torch.linspace(0.5, 2, 6), bias=torch.linspace(-1, 1, 6)),
], ids=["mean_shift", "iti", "linear_act", "linear_act-unclamped", "linear_act-identity", "lineas"])
def test_every_family_delta_form_is_its_delta_and_scaled_scales_it(m):
    x = torch.randn(2, 5, 6) * 4
    assert torch.equal(_from_form(m.delta_form(), x), m.delta(x).expand_as(x))
    torch.testing.assert_close(m.scaled(0.3).delta(x).expand_as(x), 0.3 * m.delta(x).expand_as(x))
    assert m.scaled(1.0) is m and type(m.scaled(0.3)) is type(m)
