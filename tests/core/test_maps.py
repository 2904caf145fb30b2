"""Each map family recovers a known transform from synthetic activations."""

import pytest
import torch

from dsas_diffusion.core import ITIC, LinearAcT, MeanShift, map_class


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_mean_shift_recovers_the_shift():
    s = torch.randn(200, 16, generator=gen())
    v = torch.linspace(-2, 2, 16)
    m = MeanShift.fit(s, s + v)
    torch.testing.assert_close(m.shift, v, atol=1e-5, rtol=0)
    x = torch.randn(3, 5, 16, generator=gen(1))
    torch.testing.assert_close(x + m.delta(x), x + v)


def test_linear_act_recovers_affine_map_per_unit_even_from_unpaired_samples():
    s = torch.randn(300, 8, generator=gen())
    beta, alpha = torch.linspace(0.5, 3, 8), torch.linspace(-1, 4, 8)
    t = (s * beta + alpha)[torch.randperm(300, generator=gen(2))]  # shuffled: no pairing to lean on
    m = LinearAcT.fit(s, t)
    torch.testing.assert_close(m.beta, beta, atol=1e-4, rtol=0)
    torch.testing.assert_close(m.alpha, alpha, atol=1e-4, rtol=0)
    x = s[:10]
    torch.testing.assert_close(x + m.delta(x), x * beta + alpha, atol=1e-4, rtol=0)


def test_linear_act_handles_different_set_sizes_and_clamps_to_source_range():
    s = torch.rand(100, 4, generator=gen())  # in [0, 1)
    t = 2 * torch.rand(37, 4, generator=gen(1)) + 1
    m = LinearAcT.fit(s, t)
    far = torch.full((1, 4), 100.0)
    # the map is evaluated at the clamped input, so the shift stays bounded
    torch.testing.assert_close(m.delta(far), ((m.beta - 1) * m.hi + m.alpha).expand(1, 4))
    unclamped = LinearAcT.fit(s, t, clamp_to_source_range=False)
    torch.testing.assert_close(unclamped.delta(far), (unclamped.beta - 1) * far + unclamped.alpha)


def test_linear_act_constant_unit_falls_back_to_a_shift():
    s = torch.randn(50, 3, generator=gen())
    s[:, 1] = 2.0
    t = s + 1
    m = LinearAcT.fit(s, t)
    assert m.beta[1] == 1 and abs(m.alpha[1] - 1) < 1e-6


def test_iti_finds_the_separating_direction_with_the_data_std():
    s = torch.randn(200, 10, generator=gen())
    t = torch.randn(200, 10, generator=gen(1))
    t[:, 3] += 4.0
    m = ITIC.fit(s, t)
    theta = m.shift / m.shift.norm()
    assert theta[3] > 0.95  # points from source to target along unit 3
    x = torch.cat([s, t])
    torch.testing.assert_close(m.shift.norm(), (x @ theta).std(), rtol=1e-4, atol=1e-4)


def test_maps_apply_to_channel_first_images_through_the_same_interface():
    from dsas_diffusion.core.hooks import as_tokens

    m = MeanShift(shift=torch.arange(3.0))
    x = torch.zeros(2, 3, 4, 5)
    tokens, restore = as_tokens(x)
    assert tokens.shape == (2, 20, 3)
    y = restore(tokens + m.delta(tokens))
    assert y.shape == x.shape and torch.equal(y[:, 2], torch.full((2, 4, 5), 2.0))


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="unknown steering method 'foo'.*linear_act"):
        map_class("foo")
