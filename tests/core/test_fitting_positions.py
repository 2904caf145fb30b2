"""Fitting reads the positions run time steers: padding never, the first token not when it is skipped.

A first token whose activation is huge (an attention sink, as in SmolLM2) must leave the fitted maps
and gates exactly as they are without it; that fails if it leaks into any pooled mean.
"""

from __future__ import annotations

import torch
from torch import nn

from dsas_diffusion.core import ActivationCapture, SteeringConfig, fit_from_activations
from dsas_diffusion.core.hooks import prefix_means, steered_positions


def test_steered_positions_drop_padding_and_each_rows_first_real_token():
    valid = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)  # right, left padded, empty
    assert steered_positions(valid, 3, 4, "cpu", skip_first=False) is valid
    assert steered_positions(valid, 3, 4, "cpu", skip_first=True).tolist() == [
        [False, True, True, False], [False, False, False, True], [False, False, False, False]]
    assert steered_positions(None, 2, 3, "cpu", skip_first=True).tolist() == [[False, True, True]] * 2
    assert steered_positions(None, 2, 3, "cpu", skip_first=False) is None


class PerToken(nn.Module):
    """Two layers that act on each position alone, so a changed first position changes nothing else."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _pooled(model, x, valid, skip_first):
    def pre_forward(hooks, args, kwargs):
        hooks.valid = valid
    with ActivationCapture(model, ["a", "b"], pre_forward=pre_forward, skip_first=skip_first) as cap:
        model(x)
        return cap.collect()


def _sets(sink: float, skip_first: bool):
    torch.manual_seed(1)
    model = PerToken()
    sets = {}
    for label, shift in (("source", 1.0), ("target", -1.0), ("control", 0.0)):
        x = torch.randn(12, 6, 8) + shift
        x[:, 0] = 0.1
        x[:6, 0, 3] = sink  # the first token of half the texts is huge in one dimension
        valid = torch.ones(12, 6, dtype=torch.bool)
        valid[::2, 4:] = False  # padding
        x[::2, 4:] = 1e6  # padding's values never matter
        sets[label] = _pooled(model, x, valid, skip_first)
    return sets


def _fit(sets):
    config = SteeringConfig(method="linear_act", pca_rank=3, held_out_fraction=0.25)
    return fit_from_activations(sets["source"], sets["target"], sets["control"], config, progress=False,
                                require_steered=False)


def test_a_huge_first_token_leaves_maps_and_gates_unchanged_when_it_is_skipped():
    plain, sink = _fit(_sets(0.1, skip_first=True)), _fit(_sets(2.4e4, skip_first=True))
    for name in plain.layers:
        assert torch.equal(plain.gates[name].weight, sink.gates[name].weight)
        assert torch.equal(plain.gates[name].bias, sink.gates[name].bias)
        for key, value in plain.maps[name].tensors().items():
            assert torch.equal(value, sink.maps[name].tensors()[key])
    # read with the first token, the sink moves every fitted gate: the check above can fail
    plain, sink = _fit(_sets(0.1, skip_first=False)), _fit(_sets(2.4e4, skip_first=False))
    assert not torch.allclose(plain.gates["b"].weight, sink.gates["b"].weight)


def test_spatial_activations_have_no_first_token_to_skip():
    conv = nn.Conv2d(2, 3, 1)
    x = torch.randn(2, 2, 3, 3)
    with ActivationCapture(conv, [""], skip_first=True) as cap:
        conv(x)
        pooled = cap.collect()[""]
    torch.testing.assert_close(pooled, conv(x).mean((2, 3)))


def test_running_means_at_marked_positions_are_what_a_causal_gate_reads():
    x = torch.randn(2, 5, 8)
    read = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)  # first token skipped, padding
    at = torch.tensor([[0, 1, 0, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    expected = torch.stack([x[0, 1], x[0, 1:4].mean(0), x[1, 1:5].mean(0)])
    torch.testing.assert_close(prefix_means(x, read, at), expected)
    model = PerToken()
    with ActivationCapture(model, ["b"], skip_first=True) as cap:
        cap.at = at
        out = model(x)
        torch.testing.assert_close(cap.collect()["b"], prefix_means(out, steered_positions(None, 2, 5, "cpu", True),
                                                                     at))
