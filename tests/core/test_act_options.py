"""The maps as the AcT authors apply them (apple/ml-act, `LinearOTHook.forward`), each against a reference
written here: Linear-AcT leaves values outside the source range untouched (`outside_source_range`), and
on spatial layers the map transports each image's per-channel spatial mean (`spatial_map`). Strength 0
stays bit-identical, the options survive a save / load, and files written before them load as before."""

import json

import pytest
import torch
from torch import nn

from dsas_diffusion import Steering, SteeringConfig
from dsas_diffusion.core.config import LayerInfo
from dsas_diffusion.core.gate import Gate
from dsas_diffusion.core.maps import LinearAcT, LinEAS, MeanShift

D = 6


def act_map(g: torch.Generator) -> dict:
    beta, alpha = 1 + 0.8 * torch.randn(D, generator=g), torch.randn(D, generator=g)
    lo = -0.6 - 0.3 * torch.rand(D, generator=g)
    return dict(beta=beta, alpha=alpha, lo=lo, hi=lo + 1.1)


def reference_tokens(x, m, strength, outside):
    """AcT on (B, K, D) activations: the affine map inside [lo, hi], per position; outside either the
    identity (AcT's own rule) or the map at the clamped value (the library's older rule)."""
    inside = (x >= m["lo"]) & (x <= m["hi"])
    transported = m["beta"] * x + m["alpha"]
    if outside == "clamp":
        xc = torch.minimum(torch.maximum(x, m["lo"]), m["hi"])
        transported = x + (m["beta"] * xc + m["alpha"] - xc)
        inside = torch.ones_like(inside)
    steered = x + strength * (transported - x)
    return torch.where(inside, steered, x)


def reference_images(x, m, strength, outside, rows=None):
    """AcT on (B, C, H, W) activations: z_ot = x - mean + T(mean), the mean over H, W per image and
    channel, the range checked on that mean (strength as AcT's lerp)."""
    mean = x.mean((2, 3), keepdim=True)
    view = {k: v.view(1, -1, 1, 1) for k, v in m.items()}
    if outside == "clamp":
        mc = torch.minimum(torch.maximum(mean, view["lo"]), view["hi"])
        shift = view["beta"] * mc + view["alpha"] - mc
    else:
        inside = (mean >= view["lo"]) & (mean <= view["hi"])
        shift = torch.where(inside, view["beta"] * mean + view["alpha"] - mean, torch.zeros_like(mean))
    if rows is not None:
        shift = shift * rows.view(-1, 1, 1, 1)
    return x + strength * shift


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Identity()

    def forward(self, x):
        return self.layer(x)


def steering(maps: dict, kind: str, **cfg) -> Steering:
    config = SteeringConfig(method=type(maps["layer"]).method, skip_first_token=False,
                            layers={"layer": LayerInfo(width=D, kind=kind, gate_accuracy=1.0)}, **cfg)
    gates = {"layer": Gate(weight=torch.zeros(D), bias=torch.tensor(50.0), accuracy=1.0)}  # lambda = 1
    return Steering(config, maps, gates)


def run(s: Steering, x, strength=1.5, gated=True, rows=None):
    model = Tokens()
    with s.attach(model, strength=strength, gated=gated, check_model=False) as handle:
        if rows is not None:
            handle._local.call.rows = rows
        return model(x)


@pytest.mark.parametrize("outside", ["identity", "clamp"])
@pytest.mark.parametrize("gated", [True, False])
def test_linear_act_outside_the_source_range_matches_the_reference(outside, gated):
    g = torch.Generator().manual_seed(0)
    m = act_map(g)
    x = 1.5 * torch.randn(2, 40, D, generator=g)  # about half the values outside [lo, hi]
    s = steering({"layer": LinearAcT(**m)}, "tokens", outside_source_range=outside)
    torch.testing.assert_close(run(s, x, gated=gated), reference_tokens(x, m, 1.5, outside), rtol=1e-5, atol=1e-5)
    if outside == "identity":
        far = (x < m["lo"]) | (x > m["hi"])
        assert far.float().mean() > 0.3 and torch.equal(run(s, x, gated=gated)[far], x[far])


@pytest.mark.parametrize("outside", ["identity", "clamp"])
def test_spatial_mean_transport_matches_the_reference_per_image_and_row(outside):
    """Each row (one image of one guidance branch) moves by the shift of its own mean, the same at
    every position, so the contrast inside the image is kept; rows switched off stay as they were."""
    g = torch.Generator().manual_seed(1)
    m = act_map(g)
    x = 0.5 * torch.randn(4, D, 3, 5, generator=g) + 0.6 * torch.randn(4, D, 1, 1, generator=g)
    s = steering({"layer": LinearAcT(**m)}, "spatial", outside_source_range=outside, spatial_map="spatial_mean")
    rows = torch.tensor([1.0, 0.0, 1.0, 1.0])  # e.g. the unconditional half of guidance not steered
    for gated in (True, False):
        got = run(s, x, gated=gated, rows=rows)
        torch.testing.assert_close(got, reference_images(x, m, 1.5, outside, rows), rtol=1e-5, atol=1e-5)
        assert torch.equal(got[1], x[1])
        contrast = got - got.mean((2, 3), keepdim=True)
        torch.testing.assert_close(contrast, x - x.mean((2, 3), keepdim=True), rtol=0, atol=1e-5)
    per_position = steering({"layer": LinearAcT(**m)}, "spatial", outside_source_range=outside,
                            spatial_map="per_position")
    assert not torch.allclose(run(per_position, x), run(s, x), atol=1e-3)  # the option changes something


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_row_delta_on_the_cpu_is_the_delta_at_the_float32_mean(dtype):
    """Eager on a CPU the row mean is taken as a sum and a division (what `mean` does there, in two calls
    that cost less inside a denoiser): the shift is the map's delta at the float32 mean of each row."""
    from dsas_diffusion.core.runtime import _row_delta

    g = torch.Generator().manual_seed(3)
    map_ = LinearAcT(**act_map(g)).to("cpu", dtype)
    tokens = (0.5 * torch.randn(3, 37, D, generator=g) + 0.3).to(dtype)
    got = _row_delta(map_, tokens, None)
    assert got.shape == (3, 1, D) and got.dtype == dtype
    torch.testing.assert_close(got, map_.delta(tokens.mean(1, keepdim=True, dtype=torch.float32).to(dtype)))


def test_spatial_mean_leaves_token_layers_shift_maps_and_learned_maps_per_position():
    g = torch.Generator().manual_seed(2)
    m = act_map(g)
    x = torch.randn(2, 7, D, generator=g)
    image = torch.randn(2, D, 2, 3, generator=g)
    for maps, kind, inp in (({"layer": LinearAcT(**m)}, "tokens", x),
                            ({"layer": MeanShift(shift=torch.randn(D, generator=g))}, "spatial", image),
                            ({"layer": LinEAS(weight=m["beta"], bias=m["alpha"])}, "spatial", image)):
        assert torch.equal(run(steering(maps, kind, spatial_map="spatial_mean"), inp),
                           run(steering(maps, kind, spatial_map="per_position"), inp)), (type(maps["layer"]).__name__,
                                                                                          kind)


@pytest.mark.parametrize("kind", ["tokens", "spatial"])
def test_strength_zero_is_bit_identical_with_the_act_options(kind):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, D, 4, 4, generator=g) if kind == "spatial" else torch.randn(2, 9, D, generator=g)
    s = steering({"layer": LinearAcT(**act_map(g))}, kind, outside_source_range="identity",
                 spatial_map="spatial_mean")
    for gated in (True, False):
        assert torch.equal(run(s, x, strength=0.0, gated=gated), x)


def test_options_round_trip_and_files_without_them_load_with_the_old_behaviour(tmp_path):
    g = torch.Generator().manual_seed(4)
    m = act_map(g)
    x = 1.5 * torch.randn(2, 40, D, generator=g)
    image = 0.5 * torch.randn(2, D, 3, 3, generator=g)
    for kind, inp in (("tokens", x), ("spatial", image)):
        s = steering({"layer": LinearAcT(**m)}, kind, outside_source_range="identity", spatial_map="spatial_mean")
        s.save_pretrained(tmp_path / kind)
        loaded = Steering.from_pretrained(tmp_path / kind)
        assert (loaded.config.outside_source_range, loaded.config.spatial_map) == ("identity", "spatial_mean")
        assert torch.equal(run(loaded, inp), run(s, inp))
        # a file written before the options existed: the same fields without them
        path = tmp_path / kind / "steering_config.json"
        doc = json.loads(path.read_text())
        del doc["outside_source_range"], doc["spatial_map"]
        path.write_text(json.dumps({**doc, "format_version": 3}))
        old = Steering.from_pretrained(tmp_path / kind)
        assert (old.config.outside_source_range, old.config.spatial_map) == ("clamp", "per_position")
        assert torch.equal(run(old, inp), run(steering({"layer": LinearAcT(**m)}, kind, outside_source_range="clamp",
                                                        spatial_map="per_position"), inp))
        assert not torch.equal(run(old, inp), run(s, inp))


def test_bad_option_values_are_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"outside_source_range='skip' is unknown; choose one of \['clamp', "):
        SteeringConfig(outside_source_range="skip")
    with pytest.raises(ValueError, match=r"spatial_map='mean' is unknown; choose one of \['per_position', "):
        SteeringConfig(spatial_map="mean")
    with pytest.raises(ValueError, match="outside_source_range must be one of"):
        LinearAcT(**act_map(torch.Generator().manual_seed(5)), outside_source_range="skip")


def test_spatial_mean_compiles_to_one_graph_without_breaks_across_strengths():
    """The transported mean is part of the compiled graph: no break, no graph per strength, eager's result."""
    from tests.graph_counts import counting

    g = torch.Generator().manual_seed(6)
    s = steering({"layer": LinearAcT(**act_map(g))}, "spatial", outside_source_range="identity",
                 spatial_map="spatial_mean")
    model, x = Tokens(), torch.randn(2, D, 3, 3, generator=g)
    handle = s.attach(model, strength=1.0, check_model=False, record_scales=False)
    try:
        eager = {}
        for strength in (1.0, 0.5, 0.0):
            handle.strength = strength
            eager[strength] = model(x)
        with counting() as seen:
            compiled = torch.compile(model, backend=seen.backend)
            for strength in (1.0, 0.5, 0.0):
                handle.strength = strength
                assert torch.equal(compiled(x), eager[strength])
    finally:
        handle.detach()
    assert seen.graphs == 1 and not seen.breaks, seen
    assert torch.equal(eager[0.0], x) and not torch.equal(eager[1.0], x)
