"""Incremental fitting (AcT's convention): each layer's map is fitted on source activations already
steered by the layers before it. For a mean shift that has a closed-form consequence: with every
layer steered, the mean steered source activation equals the target's at every layer, which a
simultaneous fit only achieves at the first layer."""

from __future__ import annotations

import pytest
import torch

from dsas_diffusion import Steering
from dsas_diffusion.llm import attach, fit_steering
from dsas_diffusion.llm.fitting import collect_activations
from tests.llm.tiny_lms import CONTROL, PAD, SOURCE, TARGET, TINY_FIT, make_model, make_tokenizer


def fit(incremental: bool, **kwargs) -> Steering:
    return fit_steering(make_model("llama"), make_tokenizer(), SOURCE, TARGET, CONTROL, method="mean_shift",
                        incremental=incremental, **TINY_FIT, **kwargs)


def mean_gap(steering: Steering) -> list[float]:
    """Per layer, |mean steered source - mean target| (largest unit), every layer steered plainly."""
    model, tokenizer = make_model("llama"), make_tokenizer()
    names = steering.layers
    target = collect_activations(model, tokenizer(TARGET)["input_ids"], PAD, names, 8, progress=False)
    with attach(steering, model, gated=False):
        source = collect_activations(model, tokenizer(SOURCE)["input_ids"], PAD, names, 8, progress=False)
    return [(source[n].double().mean(0) - target[n].double().mean(0)).abs().max().item() for n in names]


def test_incremental_mean_shifts_land_on_the_target_mean_at_every_layer():
    incremental, simultaneous = fit(True), fit(False)
    assert incremental.config.incremental and not simultaneous.config.incremental
    assert torch.equal(incremental.maps[incremental.layers[0]].shift, simultaneous.maps[simultaneous.layers[0]].shift)
    assert max(mean_gap(incremental)) < 1e-4
    assert max(mean_gap(simultaneous)[1:]) > 1e-2


def test_incremental_is_refused_for_learned_maps_and_must_be_a_bool():
    with pytest.raises(ValueError, match="incremental=True refits closed-form maps.*drop incremental=True"):
        fit_steering(make_model("llama"), make_tokenizer(), SOURCE, TARGET, CONTROL, method="lineas", incremental=True)
    with pytest.raises(TypeError, match="incremental must be"):
        fit("yes")
