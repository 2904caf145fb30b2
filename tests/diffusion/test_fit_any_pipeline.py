"""Fitting goes through one path for every family: a stock pipeline and its named counterpart fit the
same steering, a steering already applied is switched off while fitting, nothing is passed that a stock
`__call__` would swallow, and a joint block's image stream is the element collected and steered."""

import pytest
import torch

from dsas_diffusion import DSASPixArtSigmaPipeline, apply_dsas, fit_pipeline_steering

from tests.conftest import CONCEPT_CONTROL, CONCEPT_SOURCE, CONCEPT_TARGET
from tests.diffusion.tiny_pipelines import CALL_KWARGS, tiny_components, tiny_pipeline

PIXART = dict(method="mean_shift", pca_rank=10, num_inference_steps=1, batch_size=12, height=16, width=16,
              progress=False, pipeline_kwargs={"use_resolution_binning": False, "clean_caption": False})


def fit(pipe, **kw):
    return fit_pipeline_steering(pipe, CONCEPT_SOURCE, CONCEPT_TARGET, CONCEPT_CONTROL, **{**PIXART, **kw})


def assert_same(a, b):
    assert a.layers == b.layers and a.config.layers == b.config.layers
    for name in a.layers:
        assert torch.equal(a.maps[name].shift, b.maps[name].shift), name
        assert torch.equal(a.gates[name].weight, b.gates[name].weight), name


@pytest.fixture(scope="module")
def stock_fit():
    pipe = tiny_pipeline("pixart_sigma")
    steering = fit(pipe)
    wrapped = ("check_inputs", "encode_prompt", "maybe_free_model_hooks", "_dsas_integration")
    assert not set(wrapped) & set(vars(pipe)), "fitting left the pipeline changed"
    return steering


def test_stock_and_named_pipelines_fit_the_same_steering(stock_fit):
    named = DSASPixArtSigmaPipeline(**tiny_components("pixart_sigma"))
    assert_same(fit(named), stock_fit)
    assert {n.split(".")[0] for n in stock_fit.layers} == {"text_encoder", "transformer"}


def test_a_steering_applied_to_the_pipeline_is_off_while_fitting(stock_fit):
    pipe = tiny_pipeline("pixart_sigma")
    applied = apply_dsas(pipe, stock_fit, strength=2.0)
    assert_same(fit(pipe), stock_fit)
    assert applied.strength == 2.0 and pipe._dsas_integration.applied == [applied]  # and back on afterwards


@pytest.mark.parametrize("kwargs, match", [
    (dict(pipeline_kwargs={"use_resolution_bining": False}), "takes no argument 'use_resolution_bining'.*swallowed"),
    (dict(pipeline_kwargs={"num_inference_steps": 3}), "'num_inference_steps' is set by the fit itself"),
    (dict(unet_layers=r".*attn2"), r"unknown option.*'unet_layers'"),
    (dict(steer="unet"), "steer='unet' is unknown"),
])
def test_bad_pipeline_fit_arguments_are_refused_by_name(kwargs, match):
    pipe = tiny_pipeline("pixart_sigma")
    with pytest.raises((TypeError, ValueError), match=match):
        fit(pipe, **kwargs)


def test_flux_block_outputs_are_fitted_and_steered_on_their_image_stream():
    """FLUX blocks return (text, image): element 1 is collected, recorded in the artifact, and steered."""
    pipe = tiny_pipeline("flux")
    steering = fit_pipeline_steering(
        pipe, CONCEPT_SOURCE, CONCEPT_TARGET, CONCEPT_CONTROL, method="mean_shift", steer="transformer",
        transformer_layers=r"(single_)?transformer_blocks\.\d+", accuracy_threshold=0.0, pca_rank=10,
        num_inference_steps=1, batch_size=12, height=32, width=32, progress=False)
    assert {info.element for info in steering.config.layers.values()} == {1}
    assert all(info.width == pipe.transformer.inner_dim for info in steering.config.layers.values())
    applied = apply_dsas(pipe, steering)
    pipe("a banana", generator=torch.Generator().manual_seed(0), **{**CALL_KWARGS["flux"], "num_inference_steps": 1})
    assert {tuple(v.shape) for v in applied.scales.values()} == {(1, 1, 8, 8)}  # the 8 x 8 image tokens


def test_conditional_steering_takes_its_gates_from_the_gate_sets():
    """The map of one concept (a red thing -> a blue one) where the gate of another (banana) fires."""
    pipe = tiny_pipeline("pixart_sigma")
    red = [f"a red {thing} on a {place}" for thing, place in (("car", "table"), ("house", "beach"), ("bird", "street"),
                                                              ("tree", "field"), ("fish", "bowl"), ("boat", "sea"))]
    kw = dict(method="mean_shift", steer="text_encoder", pca_rank=10, progress=False)
    banana = fit_pipeline_steering(pipe, CONCEPT_SOURCE, CONCEPT_TARGET, CONCEPT_CONTROL, **kw)
    conditional = fit_pipeline_steering(pipe, red, [p.replace("red", "blue") for p in red], CONCEPT_CONTROL,
                                        gate_source=CONCEPT_SOURCE, gate_control=CONCEPT_CONTROL, **kw)
    assert conditional.config.num_examples == {"source": 6, "target": 6, "control": 12, "gate_source": 12,
                                               "gate_control": 12}
    for name in banana.layers:
        assert torch.equal(conditional.gates[name].weight, banana.gates[name].weight), name
        assert not torch.equal(conditional.maps[name].shift, banana.maps[name].shift), name
