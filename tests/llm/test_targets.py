"""Layer presets resolve to real modules on every family, found from the model's structure; bad
patterns teach the fix."""

from __future__ import annotations

import pytest
import torch

from torch import nn

from dsas_diffusion.llm import layer_presets, resolve_layers
from tests.llm.tiny_lms import make_model

_LLAMA_LIKE = {"residual": r"model\.layers\.\d+",
               "post_attention_layernorm": r"model\.layers\.\d+\.post_attention_layernorm",
               "o_proj": r"model\.layers\.\d+\.self_attn\.o_proj"}
_GEMMA2_LIKE = {**_LLAMA_LIKE, "post_feedforward_layernorm": r"model\.layers\.\d+\.post_feedforward_layernorm"}
# The per-family table these presets replaced: (default, presets). Steerings saved before keep these patterns as
# their targets, so structural resolution must give the very same strings.
FORMER_TABLE = {
    "llama": ("residual", _LLAMA_LIKE), "mistral": ("residual", _LLAMA_LIKE), "qwen2": ("residual", _LLAMA_LIKE),
    "qwen3": ("residual", _LLAMA_LIKE), "gemma": ("residual", _LLAMA_LIKE),
    "gemma2": ("post_feedforward_layernorm", _GEMMA2_LIKE), "gemma3_text": ("post_feedforward_layernorm", _GEMMA2_LIKE),
    "gpt2": ("residual", {"residual": r"transformer\.h\.\d+", "o_proj": r"transformer\.h\.\d+\.attn\.c_proj"}),
}


def _auto_model(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type", sorted(FORMER_TABLE))
def test_every_preset_matches_one_module_per_layer_as_the_former_table_did(model_type):
    torch.manual_seed(0)
    model = make_model("gpt2") if model_type == "gpt2" else _auto_model(model_type)
    default, former = FORMER_TABLE[model_type]
    found_default, presets = layer_presets(model)
    assert {k: v for k, v in presets.items() if k in former} == former
    for preset in presets:
        pattern, names = resolve_layers(model, preset)
        assert pattern == presets[preset]
        assert len(names) == 2, (preset, names)
    assert found_default == default and resolve_layers(model)[0] == former[default]


def test_default_layers_of_each_family(model, family):
    expected = {"gpt2": ["transformer.h.0", "transformer.h.1"], "llama": ["model.layers.0", "model.layers.1"],
                "qwen2": ["model.layers.0", "model.layers.1"],
                "gemma2": ["model.layers.0.post_feedforward_layernorm", "model.layers.1.post_feedforward_layernorm"]}
    assert resolve_layers(model)[1] == expected[family]


def test_a_regex_overrides_the_presets():
    _, names = resolve_layers(make_model("llama"), r"model\.layers\.1\.mlp")
    assert names == ["model.layers.1.mlp"]


def test_an_unknown_model_type_is_resolved_from_its_structure():
    model = make_model("llama")
    model.config.model_type = "my_new_lm"
    assert resolve_layers(model) == (r"model\.layers\.\d+", ["model.layers.0", "model.layers.1"])


def test_a_model_without_decoder_blocks_asks_for_layers():
    model = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 8))
    expected = r"found no decoder blocks in Sequential.*_no_split_modules.*Pass layers= a regular expression"
    for layers in (None, "o_proj"):
        with pytest.raises(ValueError, match=expected):
            resolve_layers(model, layers)


def test_a_preset_the_blocks_lack_names_what_was_looked_for():
    expected = (r"layers='post_feedforward_layernorm' is a preset, but no module of the model \(GPT2LMHeadModel\).*"
                r"post_feedforward_layernorm.*presets for gpt2: \['o_proj', 'post_attention_layernorm', 'residual'\]")
    with pytest.raises(ValueError, match=expected):
        resolve_layers(make_model("gpt2"), "post_feedforward_layernorm")


def test_the_text_decoder_wins_over_other_stacks_of_blocks():
    """A vision tower (a longer list of the same block class) must not be taken for the decoder."""
    model = make_model("llama")
    model.vision_tower = nn.ModuleList(make_model("llama", layers=3).model.layers)
    assert resolve_layers(model)[1] == ["model.layers.0", "model.layers.1"]


def test_blocks_that_name_their_parts_differently_get_a_pattern_matching_exactly_them():
    model = make_model("llama")
    attention = model.model.layers[1].self_attn
    attention.out_proj = attention.o_proj  # another family's name in one block (hybrid models mix block types)
    del attention.o_proj
    pattern, names = resolve_layers(model, "o_proj")
    assert names == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.out_proj"]
    assert pattern == r"model\.layers\.\d+\.(?:self_attn\.o_proj|self_attn\.out_proj)"
    # where that pattern would also take a module not chosen, the exact names are spelled out
    model.model.layers[0].self_attn.out_proj = nn.Linear(4, 4)
    pattern, names = resolve_layers(model, "o_proj")
    assert names == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.out_proj"]
    assert pattern == r"(?:model\.layers\.0\.self_attn\.o_proj|model\.layers\.1\.self_attn\.out_proj)"


def test_pattern_matching_nothing_lists_module_names_and_presets():
    expected = (r"matches the layer pattern.*look like: transformer.*"
                r"presets for gpt2: \['o_proj', 'post_attention_layernorm', 'residual'\]")
    with pytest.raises(ValueError, match=expected):
        resolve_layers(make_model("gpt2"), r"model\.blocks\.\d+")


def test_layers_must_be_a_string():
    with pytest.raises(TypeError, match="layers must be"):
        resolve_layers(make_model("gpt2"), ["transformer.h.0"])
