"""Layer presets resolve to real modules on every supported family; bad patterns teach the fix."""

from __future__ import annotations

import pytest
import torch

from dsas_diffusion.llm import LAYER_PRESETS, resolve_layers
from tests.llm.tiny_lms import make_model


def _auto_model(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type", sorted(LAYER_PRESETS))
def test_every_preset_matches_one_module_per_layer(model_type):
    torch.manual_seed(0)
    model = make_model("gpt2") if model_type == "gpt2" else _auto_model(model_type)
    default, presets = LAYER_PRESETS[model_type]
    for preset in presets:
        pattern, names = resolve_layers(model, preset)
        assert pattern == presets[preset]
        assert len(names) == 2, (preset, names)
    assert resolve_layers(model)[0] == presets[default]


def test_default_layers_of_each_family(model, family):
    expected = {"gpt2": ["transformer.h.0", "transformer.h.1"], "llama": ["model.layers.0", "model.layers.1"],
                "qwen2": ["model.layers.0", "model.layers.1"],
                "gemma2": ["model.layers.0.post_feedforward_layernorm", "model.layers.1.post_feedforward_layernorm"]}
    assert resolve_layers(model)[1] == expected[family]


def test_a_regex_overrides_the_presets():
    _, names = resolve_layers(make_model("llama"), r"model\.layers\.1\.mlp")
    assert names == ["model.layers.1.mlp"]


def test_unknown_architecture_asks_for_layers():
    model = make_model("llama")
    model.config.model_type = "my_new_lm"
    with pytest.raises(ValueError, match=r"model_type='my_new_lm'.*pass layers="):
        resolve_layers(model)


def test_pattern_matching_nothing_lists_module_names_and_presets():
    expected = r"matches the layer pattern.*look like: transformer.*presets for gpt2: \['o_proj', 'residual'\]"
    with pytest.raises(ValueError, match=expected):
        resolve_layers(make_model("gpt2"), r"model\.blocks\.\d+")


def test_layers_must_be_a_string():
    with pytest.raises(TypeError, match="layers must be"):
        resolve_layers(make_model("gpt2"), ["transformer.h.0"])
