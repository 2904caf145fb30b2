"""Fit inputs: every bad argument of a fit is refused by name before any model runs, duplicated
examples are dropped (with a warning) before the held-out split, and a layer whose output is not
a tensor is named with what to pick instead, when fitting and when steering."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from torch import nn

from dsas_diffusion import SteeringConfig
from dsas_diffusion.core import ActivationCapture, fit_from_activations
from dsas_diffusion.llm import attach, fit_steering
from tests.conftest import CONCEPT_CONTROL, CONCEPT_SOURCE, CONCEPT_TARGET
from tests.llm.tiny_lms import CONTROL, SOURCE, TARGET, TINY_FIT, fitted, make_model, make_tokenizer, right_padded


def _model_runs(*modules: nn.Module) -> list:
    calls = []
    for m in modules:
        m.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


def _lm_fit(model=None, **kwargs):
    args = dict(source=SOURCE, target=TARGET, control=CONTROL, **TINY_FIT)
    args.update(kwargs)
    return fit_steering(model if model is not None else make_model("gpt2"), make_tokenizer(), **args)


def _pipe_fit(pipe, source=CONCEPT_SOURCE, target=CONCEPT_TARGET, control=CONCEPT_CONTROL, **kwargs):
    return pipe.fit_steering(source, target, control, **{"steer": "text_encoder", "progress": False, "pca_rank": 10,
                                                         **kwargs})


# --- bad arguments, by name, before the model runs ---------------------------------------------

# (argument, value, exception): the message must name the argument
LM_CASES = [
    ("logistic_l2", float("nan"), ValueError),
    ("logistic_l2", float("inf"), ValueError),
    ("logistic_l2", 0.0, ValueError),
    ("logistic_l2", "1.0", TypeError),
    ("pca_rank", True, TypeError),
    ("pca_rank", 5.0, TypeError),
    ("pca_rank", "5", TypeError),
    ("accuracy_threshold", float("nan"), ValueError),
    ("accuracy_threshold", 1.5, ValueError),
    ("accuracy_threshold", None, TypeError),
    ("held_out_fraction", 1.0, ValueError),
    ("held_out_fraction", -0.1, ValueError),
    ("lambda_floor", float("nan"), ValueError),
    ("seed", 1.5, TypeError),
    ("seed", -1, ValueError),
    ("seed", True, TypeError),
    ("gating", "tokens", ValueError),
    ("skip_first_token", "no", TypeError),
    ("clamp_to_source_range", 1, TypeError),
    ("batch_size", 2.0, TypeError),
    ("batch_size", -3, ValueError),
    ("batch_size", True, TypeError),
    ("progress", "yes", TypeError),
    ("layers", 3, TypeError),
    ("layers", r"model\.layers\.(", ValueError),
    ("method", "steer_harder", ValueError),
    ("method", ["mean_shift"], ValueError),
    ("source", {"i see a banana", "i see a red banana"}, TypeError),
    ("source", [1, 2, 3], TypeError),
    ("control", None, TypeError),
    ("cv_folds", 1, ValueError),
    ("cv_folds", -2, ValueError),
    ("cv_folds", 4.0, TypeError),
    ("gate_activation", "tanh", ValueError),
    ("outside_source_range", "mirror", ValueError),
    ("spatial_map", "per_pixel", ValueError),
    ("gates", "learned", ValueError),
    ("gate_source", "a banana", TypeError),
    ("gate_control", [1, 2], TypeError),
    ("training", {"steps": -1}, ValueError),
    ("incremental", "yes", TypeError),
]


@pytest.mark.parametrize("argument, value, error", LM_CASES, ids=[f"{a}={v!r}" for a, v, _ in LM_CASES])
def test_lm_fit_refuses_a_bad_argument_by_name_before_the_model_runs(argument, value, error):
    model = make_model("gpt2")
    calls = _model_runs(model)
    with pytest.raises(error, match=re.escape(argument)) as info:
        _lm_fit(model, **{argument: value})
    assert not calls
    if argument == "method":
        assert "mean_shift" in str(info.value) and "linear_act" in str(info.value)  # lists the known ones


def test_lm_fit_names_the_default_as_the_fix():
    with pytest.raises(ValueError, match=r"logistic_l2 must be a finite number > 0, got nan; pass e.g. "
                                         r"logistic_l2=1\.0 \(the default\)"):
        _lm_fit(logistic_l2=math.nan)


def test_lm_fit_refuses_weights_on_the_meta_device():
    with pytest.raises(ValueError, match="meta"):
        _lm_fit(make_model("gpt2").to("meta"))


PIPE_CASES = [
    ("guidance_scale", float("nan"), ValueError),
    ("guidance_scale", "7.5", TypeError),
    ("num_inference_steps", 0, ValueError),
    ("num_inference_steps", 2.5, TypeError),
    ("height", 36, ValueError),
    ("width", "64", TypeError),
    ("unet_layers", "(", ValueError),
    ("unet_layers", r"no\.such\.module", ValueError),  # found missing before the text encoder stage runs
    ("text_encoder_layers", 5, TypeError),
    ("seed", "0", TypeError),
    ("batch_size", 0, ValueError),
    ("logistic_l2", float("inf"), ValueError),
    ("pca_rank", 2.5, TypeError),
    ("progress", None, TypeError),
    ("state", object(), TypeError),
    ("num_steps", 3, TypeError),  # a typo of num_inference_steps
]


@pytest.mark.parametrize("argument, value, error", PIPE_CASES, ids=[f"{a}={v!r}" for a, v, _ in PIPE_CASES])
def test_pipeline_fit_refuses_a_bad_argument_by_name_before_any_model_runs(dsas_pipe, argument, value, error):
    calls = _model_runs(dsas_pipe.text_encoder, dsas_pipe.unet)
    with pytest.raises(error, match=re.escape(argument)):
        _pipe_fit(dsas_pipe, steer="both", **{argument: value})
    assert not calls


def test_an_unknown_pipeline_option_lists_the_fit_arguments(dsas_pipe):
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['num_steps'\].*num_inference_steps"):
        _pipe_fit(dsas_pipe, num_steps=3)


def test_fit_from_activations_refuses_a_config_changed_after_creation_and_mismatched_layers():
    acts = {"layer": torch.randn(8, 4)}
    config = SteeringConfig(method="mean_shift", pca_rank=2)
    config.logistic_l2 = math.nan  # set after __post_init__ ran
    with pytest.raises(ValueError, match="logistic_l2"):
        fit_from_activations(acts, acts, acts, config, progress=False)
    with pytest.raises(ValueError, match="control activations are for layers"):
        fit_from_activations(acts, acts, {"other": torch.randn(8, 4)}, SteeringConfig(method="mean_shift", pca_rank=2),
                             progress=False)


# --- duplicates and overlap ---------------------------------------------------------------------

def test_one_repeated_prompt_is_refused_as_one_example_with_a_warning():
    with pytest.warns(UserWarning, match=r"the source set holds 11 duplicate example\(s\) \(1 distinct of 12\)"):
        with pytest.raises(ValueError, match=r"the source set has 1 distinct example\(s\) \(11 duplicate\(s\) "
                                             r"dropped\); pass at least 2"):
            _lm_fit(source=[SOURCE[0]] * 12)


def test_duplicates_are_dropped_before_the_held_out_split():
    """Repeating a quarter of the source prompts fits exactly the steering of the distinct prompts:
    no repeat can sit on both sides of the split."""
    with pytest.warns(UserWarning, match=r"the source set holds 6 duplicate"):
        steering = _lm_fit(source=SOURCE + SOURCE[:6], method="mean_shift")
    reference = fitted("gpt2")
    assert steering.config.num_examples == {"source": 24, "target": 24, "control": 24}
    for name in reference.layers:
        assert steering.config.layers[name].gate_accuracy == reference.config.layers[name].gate_accuracy
        torch.testing.assert_close(steering.gates[name].weight, reference.gates[name].weight, rtol=0, atol=0)
        torch.testing.assert_close(steering.maps[name].shift, reference.maps[name].shift, rtol=0, atol=0)


def test_texts_the_model_cannot_tell_apart_are_duplicates():
    """The word-level tokenizer splits on any whitespace: 'i  see' and 'i see' are the same tokens."""
    spaced = SOURCE[0].replace(" ", "  ")
    with pytest.warns(UserWarning, match=rf"1 duplicate.*{re.escape(repr(spaced))} \(the model sees it as "):
        with pytest.raises(ValueError, match="source set has 1 distinct"):
            _lm_fit(source=[SOURCE[0], spaced])


def test_distinct_examples_warn_nothing():
    model = make_model("gpt2")
    calls = _model_runs(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="pca_rank=100"):  # stop before the model runs
            _lm_fit(model, pca_rank=100)
    assert not calls


def test_prompts_in_both_source_and_control_are_refused():
    with pytest.raises(ValueError, match=r"2 example\(s\) are in both the source and the control set.*Remove them"):
        _lm_fit(control=CONTROL[:20] + SOURCE[3:5])


def test_a_source_prompt_left_unchanged_in_the_target_set_warns(dsas_pipe):
    calls = _model_runs(dsas_pipe.text_encoder)
    with pytest.warns(UserWarning, match=r"1 source example\(s\) are also in the target set"):
        with pytest.raises(ValueError, match="text_encoder_layers"):  # stop before the model runs
            _pipe_fit(dsas_pipe, target=CONCEPT_TARGET[:-1] + [CONCEPT_SOURCE[0]], text_encoder_layers=r"no\.such")
    assert not calls


def test_pipeline_drops_prompts_that_differ_only_in_case(dsas_pipe):
    """CLIP's tokenizer lowercases: 'A PHOTO ...' is the same input as 'a photo ...'."""
    loud = CONCEPT_CONTROL[0].upper()
    with pytest.warns(UserWarning, match=r"the control set holds 1 duplicate"):
        steering = _pipe_fit(dsas_pipe, control=CONCEPT_CONTROL + [loud], method="mean_shift")
    assert steering.config.num_examples["control"] == len(CONCEPT_CONTROL)


def test_pipeline_refuses_one_repeated_prompt(dsas_pipe):
    with pytest.warns(UserWarning, match="the control set holds 11 duplicate"):
        with pytest.raises(ValueError, match="the control set has 1 distinct example"):
            _pipe_fit(dsas_pipe, control=[CONCEPT_CONTROL[0]] * 12)


# --- layers whose output is not a tensor ---------------------------------------------------------

@pytest.mark.parametrize("family, layers, output, suggestion", [
    ("llama", "model", "BaseModelOutputWithPast", r"model\.layers\.\d+"),
    ("gpt2", "transformer", "BaseModelOutputWithPastAndCrossAttentions", r"transformer\.h\.\d+"),
])
def test_fitting_a_layer_that_returns_a_model_output_names_it_and_what_to_pick(family, layers, output, suggestion):
    shown = re.escape(f"r'{suggestion}'")  # written as the user would type it
    with pytest.raises(ValueError, match=rf"layer '{layers}' .*returns a {output}.*{shown}"):
        _lm_fit(make_model(family), layers=layers)


def test_pipeline_fit_on_the_text_encoder_stack_names_it(dsas_pipe):
    with pytest.raises(ValueError, match=r"layer '(text_model\.)?encoder' \(CLIPEncoder\) returns a BaseModelOutput"):
        _pipe_fit(dsas_pipe, text_encoder_layers=r"(text_model\.)?encoder")


def test_steering_a_layer_whose_output_became_a_dict_names_it_at_run_time():
    model = make_model("llama")
    steering = fitted("llama")
    name = steering.steered_layers[0]
    module = model.get_submodule(name)
    forward = module.forward  # the module itself returns a dict (a forward hook would run after the steering's)
    module.forward = lambda *args, **kwargs: {"hidden_states": forward(*args, **kwargs)}
    with attach(steering, model, 1.0):
        with pytest.raises(ValueError, match=rf"layer '{re.escape(name)}' \(\w+\) returns a dict .*hidden_states"):
            model(**right_padded(make_tokenizer(), ["i see a banana"]))


def test_capturing_a_tuple_without_a_leading_tensor_names_the_layer():
    class Pair(nn.Module):
        def forward(self, x):
            return None, x

    root = nn.Sequential(nn.Linear(4, 4), Pair())
    with ActivationCapture(root, ["1"]):
        with pytest.raises(ValueError, match=r"layer '1' \(Pair\) returns a tuple whose first element is a NoneType"):
            root(torch.randn(2, 3, 4))
