"""`dsas fit --outside-source-range` / `--spatial-map`: the choices are the config's own, a bad value is an
argument error naming them, and the value given reaches the saved steering (default: the config's)."""

from __future__ import annotations

import json

import pytest

from dsas_diffusion import Steering, SteeringConfig
from dsas_diffusion.core.config import SPATIAL_MAPS
from dsas_diffusion.core.maps import OUTSIDE_SOURCE_RANGE

from .conftest import run_cli

NO_MODEL = ["fit", "--model", "no-model", "--prompt-set", "no-prompts", "--out", "steering"]


@pytest.mark.parametrize("option, choices", [("--outside-source-range", OUTSIDE_SOURCE_RANGE),
                                             ("--spatial-map", SPATIAL_MAPS)])
def test_a_bad_value_is_an_argument_error_listing_the_configs_choices(option, choices, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(*NO_MODEL, option, "sideways")
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"dsas fit: error: argument {option}: invalid choice: 'sideways'" in err
    assert all(repr(c) in err.split("choose from")[1] for c in choices)


def test_without_the_options_the_steering_records_the_configs_defaults(steering_dir):
    config = json.loads((steering_dir / "steering_config.json").read_text())
    assert config["outside_source_range"] == SteeringConfig.outside_source_range == "clamp"
    assert config["spatial_map"] == SteeringConfig.spatial_map == "spatial_mean"


def test_the_options_given_reach_the_saved_steering(sd_dir, prompts, tmp_path):
    out = tmp_path / "act-options"
    assert run_cli("fit", "--model", sd_dir, "--prompt-set", prompts["dir"], "--method", "linear_act",
                   "--outside-source-range", "identity", "--spatial-map", "per_position", "--pca-rank", 3,
                   "--threshold", "0.5", "--steps", 2, "--out", out, "--no-progress") == 0
    config = Steering.from_pretrained(out).config
    assert (config.outside_source_range, config.spatial_map) == ("identity", "per_position")
    assert any(info.kind == "spatial" for info in config.layers.values())  # the UNet's layers, where the map acts
