"""The shipped toy text-to-image world: DSAS removes a colour from held-out source prompts and
leaves held-out control prompts almost untouched, where plain steering damages them.

Measured by exact pixel rules (dsas_diffusion.toy.t2i_world); margins leave room for noise.
"""

from pathlib import Path

import pytest
import torch

from dsas_diffusion import DSASStableDiffusionPipeline
from dsas_diffusion.toy.t2i_eval import concept_split, measure

CHECKPOINT = Path(__file__).resolve().parents[2] / "assets" / "toy-t2i"
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def world():
    pipe = DSASStableDiffusionPipeline.from_pretrained(CHECKPOINT)
    pipe.set_progress_bar_config(disable=True)
    split = concept_split("red", "green")
    with torch.no_grad():
        base = measure(pipe, split, SEEDS)
    return pipe, split, base


def test_the_shipped_model_draws_what_it_is_asked(world):
    _, _, base = world
    assert base["concept_rate"] >= 0.9  # red prompts give red shapes
    assert base["control_faithful"] >= 0.75  # other prompts give their colour and shape


@pytest.mark.parametrize("method", ["mean_shift", "linear_act"])
def test_dsas_removes_the_concept_and_spares_controls_where_plain_steering_does_not(world, method):
    pipe, split, base = world
    steering = pipe.fit_steering(split.source, split.target, split.control, method=method, steer="text_encoder",
                                 progress=False)
    dsas = measure(pipe, split, SEEDS, baseline=base, steering=steering, steering_strength=1.0)
    plain = measure(pipe, split, SEEDS, baseline=base, steering=steering, steering_strength=1.0, gated=False)
    assert dsas["concept_rate"] <= 0.2 and plain["concept_rate"] <= 0.2
    assert dsas["control_faithful"] >= base["control_faithful"] - 0.1
    assert plain["control_faithful"] <= base["control_faithful"] - 0.3
    assert dsas["control_drift"] * 4 < plain["control_drift"]
