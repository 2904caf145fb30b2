"""Run-time options are checked once where they enter (Steering.attach, llm.attach, handle assignment,
the pipeline call, set_steering), and a module is never steered by two attachments at once."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from dsas_diffusion import Steering, SteeringConfig
from dsas_diffusion.core import ActivationCapture, Gate, MeanShift, RunOptions
from dsas_diffusion.core.fingerprint import fingerprint

NAN, INF = float("nan"), float("inf")


class Tiny(nn.Module):
    def __init__(self, d=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList([nn.Linear(d, d) for _ in range(2)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def made_steering(root: nn.Module, names, prefix: str = "", width: int = 8, base_model: str = "tiny", seed: int = 0):
    """A steering built by hand (no fit): a random shift and gate per layer, with the root's fingerprint."""
    g = torch.Generator().manual_seed(seed)
    full = [prefix + n for n in names]
    info, probe = fingerprint(root)
    key = prefix.rstrip(".")
    config = SteeringConfig(method="mean_shift", base_model=base_model, fingerprint={key: info},
                            layers={n: {"width": width, "gate_accuracy": 1.0} for n in full})
    return Steering(config, {n: MeanShift(shift=torch.randn(width, generator=g)) for n in full},
                    {n: Gate(weight=torch.randn(width, generator=g), bias=torch.zeros(()), accuracy=1.0) for n in full},
                    probes={key: probe})


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.fixture
def tiny():
    model = Tiny()
    return model, made_steering(model, ["blocks.0", "blocks.1"])


# ---- Steering.attach ---------------------------------------------------------------------------------------
BAD_ATTACH = [
    (dict(strength=NAN), ValueError, "strength must be a finite number"),
    (dict(strength=INF), ValueError, "strength must be a finite number"),
    (dict(strength=-INF), ValueError, "strength must be a finite number"),
    (dict(strength=1e30), ValueError, r"strength=1e\+30 is out of range.*at most 1000.*half precision"),
    (dict(strength=-2000), ValueError, "strength=-2000.0 is out of range"),
    (dict(strength="1.0"), TypeError, "strength must be a real number.*'1.0' \\(str\\)"),
    (dict(strength=True), TypeError, "strength must be a number.*boolean True"),
    (dict(strength=None), TypeError, "strength must be a real number.*None"),
    (dict(strength=torch.tensor([1.0, 2.0])), TypeError, r"strength must be one number.*shape \(2,\)"),
    (dict(strength=np.array([1.0, 2.0, 3.0])), TypeError, r"strength must be one number.*shape \(3,\)"),
    (dict(strength=torch.tensor(True)), TypeError, "strength must be a real number.*dtype torch.bool"),
    (dict(strength=1 + 2j), TypeError, "strength must be a real number"),
    (dict(gating="tokens"), ValueError, r"gating='tokens' is unknown; choose one of \['token', 'causal', 'sequence'\]"),
    (dict(gating=1), TypeError, "gating must be one of"),
    (dict(lambda_floor=1.0), ValueError, r"lambda_floor must lie in \[0, 1\), got 1.0"),
    (dict(lambda_floor=-0.1), ValueError, r"lambda_floor must lie in \[0, 1\), got -0.1"),
    (dict(lambda_floor=NAN), ValueError, "lambda_floor must be a finite number"),
    (dict(lambda_floor="0.1"), TypeError, "lambda_floor must be a real number"),
    (dict(gated="false"), TypeError, "gated must be True or False, got 'false'"),
    (dict(gated=0), TypeError, r"gated must be True or False, got 0 \(int\)"),
    (dict(skip_first_token=1), TypeError, "skip_first_token must be True or False"),
    (dict(record_scales="yes"), TypeError, "record_scales must be True or False"),
    (dict(layers="blocks.0"), TypeError, r"layers must be a list of layer names"),
    (dict(layers=[0]), TypeError, "layers must hold layer names"),
    (dict(layers=[]), ValueError, r"layers=\[\] selects no layer"),
    (dict(layers=["blocks.7"]), ValueError, r"layers \['blocks.7'\] are not in this steering"),
    (dict(check_model="no"), TypeError, "check_model must be True or False"),
    (dict(prefix=None), TypeError, "prefix must be a string"),
    (dict(prefix="unet."), ValueError, "holds no layers for 'unet'"),
    (dict(prefix="unet.", check_model=False), ValueError, "none of the chosen layers starts with prefix='unet.'"),
    (dict(pre_forward=3), TypeError, "pre_forward must be a callable"),
    (dict(gatting="token"), TypeError, r"unknown attach\(\) option 'gatting' \(did you mean 'gating'\?\).*'lambda_floor'"),
    (dict(strenght=1.0), TypeError, r"'strenght' \(did you mean 'strength'\?\)"),
]


@pytest.mark.parametrize("options, error, match", BAD_ATTACH, ids=[f"{next(iter(o))}={o[next(iter(o))]!r}"[:40]
                                                                   for o, _, _ in BAD_ATTACH])
def test_attach_refuses_bad_options_and_leaves_no_hooks(tiny, options, error, match):
    model, steering = tiny
    with pytest.raises(error, match=match):
        steering.attach(model, **options)
    assert no_hooks(model)


def test_attach_refuses_what_is_not_a_model(tiny):
    _, steering = tiny
    with pytest.raises(TypeError, match="model must be a torch.nn.Module.*got str"):
        steering.attach("blocks")


@pytest.mark.parametrize("strength", [2, 0.5, -1.0, np.float32(1.5), np.int64(2), torch.tensor(2.0),
                                      torch.tensor([0.5]), np.array(3.0)])
def test_attach_accepts_any_real_number_and_stores_a_float(tiny, strength):
    model, steering = tiny
    x = torch.randn(2, 3, 8)
    with steering.attach(model, strength=float(np.asarray(strength).item())) as reference:
        expected = model(x)
    with steering.attach(model, strength=strength) as handle:
        assert type(handle.strength) is float and handle.options == reference.options
        assert torch.equal(model(x), expected)


def test_options_default_to_the_config_and_never_change_it(tiny):
    model, steering = tiny
    before = steering.config.to_dict()
    with steering.attach(model, gating="sequence", lambda_floor=0.25, skip_first_token=False) as handle:
        assert handle.options == RunOptions(strength=1.0, gated=True, gating="sequence", lambda_floor=0.25,
                                            skip_first_token=False, record_scales=True)
    with steering.attach(model) as handle:
        assert (handle.gating, handle.lambda_floor, handle.skip_first_token) == ("token", 0.0, True)
    assert steering.config.to_dict() == before


def test_run_options_are_checked_when_made_and_replaced(tiny):
    _, steering = tiny
    with pytest.raises(ValueError, match="strength must be a finite number"):
        RunOptions(strength=NAN)
    with pytest.raises(TypeError, match=r"unknown run option 'floor' \(did you mean 'lambda_floor'\?\)"):
        RunOptions.from_config(steering.config, floor=0.1)
    options = RunOptions.from_config(steering.config, strength=2)
    assert options.strength == 2.0 and options.gating == steering.config.gating
    with pytest.raises(ValueError, match="lambda_floor must lie in"):
        options.replace(lambda_floor=5)
    with pytest.raises(AttributeError):
        options.strength = 3.0  # frozen: a held RunOptions stays valid


# ---- assignments to a handle between calls -----------------------------------------------------------------
@pytest.mark.parametrize("name, value, error, match", [
    ("strength", NAN, ValueError, "strength must be a finite number"),
    ("strength", 1e30, ValueError, "strength=1e\\+30 is out of range"),
    ("strength", "2", TypeError, "strength must be a real number"),
    ("gated", "false", TypeError, "gated must be True or False"),
    ("gated", 1, TypeError, "gated must be True or False"),
    ("gating", "mean", ValueError, "gating='mean' is unknown"),
    ("lambda_floor", 2, ValueError, "lambda_floor must lie in"),
    ("skip_first_token", None, TypeError, "skip_first_token must be True or False"),
    ("record_scales", 0, TypeError, "record_scales must be True or False"),
])
def test_handle_assignment_is_checked_and_keeps_the_old_value(tiny, name, value, error, match):
    model, steering = tiny
    with steering.attach(model, strength=0.5) as handle:
        before = handle.options
        with pytest.raises(error, match=match):
            setattr(handle, name, value)
        assert handle.options == before


def test_handle_assignment_takes_effect(tiny):
    model, steering = tiny
    x = torch.randn(2, 3, 8)
    with steering.attach(model, strength=2.0) as handle:
        expected = model(x)
    with steering.attach(model, strength=0.5) as handle:
        handle.strength = torch.tensor(2.0)
        assert handle.strength == 2.0 and torch.equal(model(x), expected)
        handle.strength = 0
        assert torch.equal(model(x), Tiny()(x))


# ---- dsas_diffusion.llm.attach -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm():
    from tests.llm.tiny_lms import fitted, make_model

    return make_model("gpt2"), fitted("gpt2")


@pytest.mark.parametrize("options, error, match", [
    (dict(strength=NAN), ValueError, "strength must be a finite number"),
    (dict(strength="strong"), TypeError, "strength must be a real number"),
    (dict(gating="global"), ValueError, "gating='global' is unknown"),
    (dict(lambda_floor=1), ValueError, r"lambda_floor must lie in \[0, 1\)"),
    (dict(gated="True"), TypeError, "gated must be True or False"),
    (dict(layers="transformer.h.0"), TypeError, "layers must be a list of layer names"),
    (dict(temperature=0.7), TypeError, r"unknown attach\(\) option 'temperature'"),
])
def test_llm_attach_refuses_bad_options(lm, options, error, match):
    from dsas_diffusion.llm import attach

    model, steering = lm
    with pytest.raises(error, match=match):
        attach(steering, model, **options)
    assert no_hooks(model)


# ---- attaching twice ---------------------------------------------------------------------------------------
def test_the_same_steering_twice_on_one_model_is_refused_naming_the_first(tiny):
    model, steering = tiny
    x = torch.randn(2, 3, 8)
    with steering.attach(model, strength=1.0) as first:
        once = model(x)
        with pytest.raises(ValueError, match=(r"(?s)layer 'blocks.0' already has a steering attached, "
                                              + re.escape(repr(steering)) + r" on the model.*twice.*handle.detach\(\)")):
            steering.attach(model, strength=1.0)
        assert torch.equal(model(x), once)  # the refused attach left nothing behind
    assert no_hooks(model) and not first.attached


def test_two_steerings_on_one_module_are_refused_but_other_modules_are_free(tiny):
    model, steering = tiny
    other = made_steering(model, ["blocks.0", "blocks.1"], base_model="other", seed=1)
    with steering.attach(model, layers=["blocks.1"]):
        with pytest.raises(ValueError, match="layer 'blocks.1' already has a steering attached.*base_model='tiny'"):
            other.attach(model)
        with other.attach(model, layers=["blocks.0"]) as h:  # a module of its own: allowed
            assert h.attached


def test_detached_and_collected_handles_never_block(tiny):
    model, steering = tiny
    handle = steering.attach(model)
    handle.detach()
    with steering.attach(model):
        pass
    steering.attach(model).detach()
    del handle
    with steering.attach(model) as h:
        assert h.attached


def test_capturing_activations_of_a_steered_model_is_not_an_attachment(tiny):
    model, steering = tiny
    with steering.attach(model), ActivationCapture(model, ["blocks.0", "blocks.1"]) as cap:
        model(torch.randn(2, 3, 8))
    assert set(cap.collect()) == {"blocks.0", "blocks.1"}
    with ActivationCapture(model, ["blocks.0"]), steering.attach(model) as h:
        assert h.attached


# ---- the pipeline ------------------------------------------------------------------------------------------
TE_LAYERS = ["encoder.layers.0", "encoder.layers.1"]


@pytest.fixture
def pipe_and_steerings(dsas_pipe):
    te = dsas_pipe.text_encoder
    return (dsas_pipe, made_steering(te, TE_LAYERS, "text_encoder.", width=32),
            made_steering(te, TE_LAYERS, "text_encoder.", width=32, base_model="second", seed=1))


def hook_count(module: nn.Module) -> int:
    return len(module._forward_hooks)


def counting_text_encoder_calls(pipe) -> list:
    calls = []
    pipe.text_encoder.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(steering_strength=NAN), ValueError, "steering_strength must be a finite number"),
    (dict(steering_strength=INF), ValueError, "steering_strength must be a finite number"),
    (dict(steering_strength=1e30), ValueError, r"steering_strength=1e\+30 is out of range"),
    (dict(steering_strength="1"), TypeError, "steering_strength must be a real number"),
    (dict(steering_strength=torch.ones(2)), TypeError, "steering_strength must be one number"),
    (dict(gated="false"), TypeError, "gated must be True or False"),
    (dict(steer_negative=1), TypeError, "steer_negative must be True or False"),
    (dict(return_steering_scales="no"), TypeError, "return_steering_scales must be True or False"),
    (dict(steering="steerings/no-banana"), TypeError,
     r"steering= takes a Steering.*path 'steerings/no-banana'.*Steering.from_pretrained.*set_steering"),
    (dict(steering=42), TypeError, "steering= takes a Steering.*got int"),
])
def test_pipeline_call_refuses_bad_arguments_before_encoding(pipe_and_steerings, kwargs, error, match):
    pipe, steering, _ = pipe_and_steerings
    pipe.set_steering(steering)
    calls = counting_text_encoder_calls(pipe)
    with pytest.raises(error, match=match):
        pipe("a banana", num_inference_steps=1, output_type="latent", **kwargs)
    assert not calls  # refused at the call, before anything was encoded


def test_pipeline_checks_its_arguments_with_no_steering_set(dsas_pipe):
    with pytest.raises(ValueError, match="steering_strength must be a finite number"):
        dsas_pipe("a banana", num_inference_steps=1, steering_strength=NAN)


def test_set_steering_refuses_bad_arguments(pipe_and_steerings):
    pipe, steering, _ = pipe_and_steerings
    with pytest.raises(TypeError, match="steering must be a Steering, the path of a saved steering folder, or None"):
        pipe.set_steering(42)
    with pytest.raises(TypeError, match="check_model must be True or False, got 'yes'"):
        pipe.set_steering(steering, check_model="yes")
    assert pipe.steering is None and no_hooks(pipe.text_encoder)


def test_set_steering_then_attaching_by_hand_is_refused(pipe_and_steerings):
    pipe, steering, _ = pipe_and_steerings
    pipe.set_steering(steering)
    layer = pipe.text_encoder.get_submodule(TE_LAYERS[0])
    with pytest.raises(ValueError, match=r"(?s)already has a steering attached.*set on a pipeline.*"
                                         r"pipe.set_steering\(None\)"):
        steering.attach(pipe.text_encoder, prefix="text_encoder.")
    assert hook_count(layer) == 1
    pipe.set_steering(None)
    with steering.attach(pipe.text_encoder, prefix="text_encoder."):  # removed: free again
        assert hook_count(layer) == 1


def test_attaching_by_hand_then_using_the_pipeline_is_refused(pipe_and_steerings):
    pipe, steering, second = pipe_and_steerings
    layer = pipe.text_encoder.get_submodule(TE_LAYERS[0])
    with steering.attach(pipe.text_encoder, prefix="text_encoder."):
        with pytest.raises(ValueError, match=r"already has a steering attached.*Detach the existing one"):
            pipe.set_steering(second)
        assert pipe.steering is None and hook_count(layer) == 1
        with pytest.raises(ValueError, match=r"already has a steering attached.*Detach the existing one"):
            pipe("a banana", steering=second, num_inference_steps=1, output_type="latent")
        assert hook_count(layer) == 1
    pipe.set_steering(second)
    assert pipe.steering is second


def test_the_pipeline_replaces_its_steering_and_steers_per_call_with_its_own_hooks(pipe_and_steerings):
    pipe, steering, second = pipe_and_steerings
    layer = pipe.text_encoder.get_submodule(TE_LAYERS[0])
    pipe.set_steering(steering)
    pipe.set_steering(second)  # replaces the first
    assert pipe.steering is second and hook_count(layer) == 1
    out = pipe("a banana", steering=steering, num_inference_steps=1, output_type="latent")  # per call: allowed
    assert out.steering_scales and hook_count(layer) == 1 and pipe.steering is second


def test_two_pipelines_sharing_modules_each_set_a_steering(pipe_and_steerings):
    from dsas_diffusion import DSASStableDiffusionPipeline

    pipe, steering, second = pipe_and_steerings
    other = DSASStableDiffusionPipeline(**pipe.components)  # shares the text encoder and UNet
    other.set_progress_bar_config(disable=True)
    pipe.set_steering(steering)
    other.set_steering(second)  # each pipeline switches on only its own hooks, in its own calls
    assert other("a banana", num_inference_steps=1, output_type="latent").steering_scales
    with pytest.raises(ValueError, match="set on a pipeline"):
        second.attach(pipe.text_encoder, prefix="text_encoder.")
