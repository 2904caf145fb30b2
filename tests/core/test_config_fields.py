"""Config fields added after format 2 (format 3: learned steering, gate activation, a layer's steered
tuple element, k-fold scores; format 4: the AcT options). Files of an earlier format (without them) load
with what they meant, a file of the current format without them is refused as damaged, one of a newer
format is refused with the fix; new values round-trip and bad ones are refused on load."""

from __future__ import annotations

import json

import pytest
import torch

from dsas_diffusion import Steering, SteeringConfig
from dsas_diffusion.core import FORMAT_VERSION, LayerInfo
from dsas_diffusion.core.gate import activate
from tests.core.test_steering import Tiny, fitted


@pytest.fixture(scope="module")
def steering():
    return fitted(Tiny(), method="mean_shift")[0]


def edit_saved(folder, edit):
    path = folder / "steering_config.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


FORMAT_3 = ("gate_activation", "gates", "training", "incremental", "cv_folds", "accuracy_scaling")
FORMAT_4 = ("outside_source_range", "spatial_map")


def test_a_format_2_file_without_the_later_fields_loads_with_their_old_meaning(steering, tmp_path):
    steering.config.outside_source_range = "identity"  # not what a format 2 file meant: the load must not keep it
    try:
        steering.save_pretrained(tmp_path)
    finally:
        steering.config.outside_source_range = "clamp"

    def format_2(doc):
        for key in FORMAT_3 + FORMAT_4:
            del doc[key]
        for layer in doc["layers"].values():
            del layer["element"], layer["gate_accuracy_std"]
        doc["format_version"] = 2

    edit_saved(tmp_path, format_2)
    config = Steering.from_pretrained(tmp_path).config
    assert (config.gate_activation, config.gates, config.training, config.incremental) == ("sigmoid", "two_stage",
                                                                                           {}, False)
    assert (config.cv_folds, config.accuracy_scaling) == (0, False)
    assert (config.outside_source_range, config.spatial_map) == ("clamp", "per_position")
    assert all(info.element == 0 and info.gate_accuracy_std != info.gate_accuracy_std
               for info in config.layers.values())


def test_a_format_3_file_loads_with_or_without_the_format_4_fields(steering, tmp_path):
    steering.save_pretrained(tmp_path)
    edit_saved(tmp_path, lambda doc: doc.__setitem__("format_version", 3))  # written between the two formats
    assert Steering.from_pretrained(tmp_path).config.spatial_map == "spatial_mean"

    def format_3(doc):
        for key in FORMAT_4:
            del doc[key]

    edit_saved(tmp_path, format_3)  # written before format 4 existed: what those files meant
    config = Steering.from_pretrained(tmp_path).config
    assert (config.outside_source_range, config.spatial_map) == ("clamp", "per_position")


@pytest.mark.parametrize("key", [*FORMAT_3, *FORMAT_4, "layer element"])
def test_a_current_file_without_a_field_of_its_format_is_refused_as_damaged(steering, tmp_path, key):
    steering.save_pretrained(tmp_path)

    def drop(doc):
        if key == "layer element":
            del doc["layers"]["blocks.0"]["element"]
        else:
            del doc[key]

    edit_saved(tmp_path, drop)
    with pytest.raises(ValueError, match=r"(required fields|must hold).*(missing).*fit and save the steering again"):
        Steering.from_pretrained(tmp_path)


def test_a_file_of_the_next_format_is_refused_with_the_fix(steering, tmp_path):
    steering.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "steering_config.json").read_text())["format_version"] == FORMAT_VERSION == 4
    edit_saved(tmp_path, lambda doc: doc.__setitem__("format_version", FORMAT_VERSION + 1))
    with pytest.raises(ValueError, match=rf"format version {FORMAT_VERSION + 1} by a newer dsas-diffusion; this "
                                         rf"version reads format <= {FORMAT_VERSION}. Upgrade"):
        Steering.from_pretrained(tmp_path)


def test_element_and_gate_activation_round_trip(steering, tmp_path):
    steering.config.layers["blocks.1"].element = 2
    steering.config.gate_activation = "relu"
    try:
        steering.save_pretrained(tmp_path)
    finally:
        steering.config.layers["blocks.1"].element = 0
        steering.config.gate_activation = "sigmoid"
    loaded = Steering.from_pretrained(tmp_path)
    assert loaded.config.layers["blocks.1"].element == 2 and loaded.config.layers["blocks.0"].element == 0
    assert loaded.config.gate_activation == "relu"


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["layers"]["blocks.0"].__setitem__("element", -1), r"layers\['blocks.0'\].element must be >= 0"),
    (lambda d: d["layers"]["blocks.0"].__setitem__("element", True), r"element must be an integer"),
    (lambda d: d["layers"]["blocks.0"].__setitem__("element", 1.0), r"element must be an integer"),
    (lambda d: d.__setitem__("gate_activation", "tanh"), r"'gate_activation' must be one of \['sigmoid', 'relu'\]"),
    (lambda d: d.__setitem__("gates", "magic"), r"'gates' must be one of \['e2e', 'two_stage'\]"),
    (lambda d: d.__setitem__("training", {"lr": "0.1"}), r"training\['lr'\] must be a number"),
    (lambda d: d.__setitem__("training", [1]), r"'training' must be an object"),
])
def test_bad_new_fields_are_refused_on_load(steering, tmp_path, edit, message):
    steering.save_pretrained(tmp_path)
    edit_saved(tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        Steering.from_pretrained(tmp_path)


def test_bad_new_fields_are_refused_when_built():
    with pytest.raises(ValueError, match="element must be a non-negative integer"):
        LayerInfo(width=4, element=-1)
    with pytest.raises(ValueError, match="gate_activation='tanh' is unknown"):
        SteeringConfig(gate_activation="tanh")


def test_relu_activation_is_a_strength_exactly_zero_below_zero():
    logits = torch.tensor([-3.0, -0.0, 0.25, 1.0, 7.0])
    assert torch.equal(activate(logits, "relu"), torch.tensor([0.0, 0.0, 0.25, 1.0, 1.0]))
    assert torch.equal(activate(logits, "sigmoid"), torch.sigmoid(logits))
    with pytest.raises(ValueError, match="gate_activation='tanh'"):
        activate(logits, "tanh")
