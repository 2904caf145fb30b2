"""Config fields added after format 2: a layer's steered tuple element and the gate activation.
Old files (without them) load unchanged; new values round-trip and bad ones are refused on load."""

from __future__ import annotations

import json

import pytest
import torch

from dsas_diffusion import Steering, SteeringConfig
from dsas_diffusion.core import LayerInfo
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


def test_a_file_without_the_new_fields_loads_with_their_old_meaning(steering, tmp_path):
    steering.save_pretrained(tmp_path)

    def drop(doc):
        del doc["gate_activation"], doc["gates"], doc["training"]
        for layer in doc["layers"].values():
            del layer["element"]

    edit_saved(tmp_path, drop)
    loaded = Steering.from_pretrained(tmp_path)
    assert loaded.config.gate_activation == "sigmoid" and loaded.config.gates == "two_stage"
    assert loaded.config.training == {}
    assert all(info.element == 0 for info in loaded.config.layers.values())


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
