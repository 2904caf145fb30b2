"""Bad input gets a clear error naming the problem and the fix."""

import pytest
import torch

from dsas_diffusion import DSASStableDiffusionPipeline

from tests.conftest import CONCEPT_CONTROL, CONCEPT_SOURCE, CONCEPT_TARGET, save_stock_pipeline


def fit(pipe, source=CONCEPT_SOURCE, target=CONCEPT_TARGET, control=CONCEPT_CONTROL, **kw):
    return pipe.fit_steering(source, target, control, **{"steer": "text_encoder", "progress": False, "pca_rank": 10, **kw})


@pytest.mark.parametrize("sets, match", [
    (dict(source=[]), "source set is empty"),
    (dict(control=["a dog"]), "control set has 1 example"),
    (dict(control=CONCEPT_SOURCE), "same examples.*only one class"),
    (dict(target="an apple"), "target must be a list"),
    (dict(source=CONCEPT_SOURCE[:-1] + [""]), "empty or non-text example"),
])
def test_bad_prompt_sets(dsas_pipe, sets, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fit(dsas_pipe, **sets)


def test_fewer_prompts_than_pca_components(dsas_pipe):
    with pytest.raises(ValueError, match="pca_rank=10 needs at least 10 .*lower pca_rank"):
        fit(dsas_pipe, source=CONCEPT_SOURCE[:3], target=CONCEPT_TARGET[:3], control=CONCEPT_CONTROL[:3])


def test_unknown_layer_pattern(dsas_pipe):
    with pytest.raises(ValueError, match="no module of the text_encoder .* matches the layer pattern 'transformer"):
        fit(dsas_pipe, text_encoder_layers=r"transformer\.h\.\d+")


def test_unknown_place_and_method(dsas_pipe):
    with pytest.raises(ValueError, match="steer='vae' is unknown"):
        fit(dsas_pipe, steer="vae")
    with pytest.raises(ValueError, match="method='caa' is unknown"):
        fit(dsas_pipe, method="caa")


def test_prompt_longer_than_the_encoder_allows(dsas_pipe):
    long = "a photo of a banana " * 20
    with pytest.raises(ValueError, match="tokens but the text encoder takes at most 77.*Shorten it"):
        fit(dsas_pipe, source=CONCEPT_SOURCE + [long])


def test_nan_activations(dsas_pipe):
    with torch.no_grad():
        dsas_pipe.text_encoder.get_submodule("encoder.layers.1.mlp.fc2").weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="contain NaN or inf.*float32"):
        fit(dsas_pipe)


def test_no_layer_separates(dsas_pipe):
    with pytest.raises(ValueError, match="(?s)no layer's gate separates.*lower accuracy_threshold"):
        fit(dsas_pipe, accuracy_threshold=1.0, control=[p.replace("banana", "dog") for p in CONCEPT_SOURCE],
            pca_rank=1)


def test_steering_for_another_model_is_refused(tmp_path, fitted_steering):
    other_size = DSASStableDiffusionPipeline.from_pretrained(save_stock_pipeline(tmp_path / "a", text_hidden=48))
    with pytest.raises(ValueError, match="fitted on a text_encoder of class CLIPTextModel with .*parameters"):
        other_size.set_steering(fitted_steering)
    other_weights = DSASStableDiffusionPipeline.from_pretrained(save_stock_pipeline(tmp_path / "b", seed=1))
    with pytest.raises(ValueError, match="other weights"):
        other_weights.set_steering(fitted_steering)
    with pytest.raises(ValueError, match="other weights"):  # also when passed per call
        other_weights("a dog", steering=fitted_steering, num_inference_steps=1)


def test_language_model_steering_is_refused_by_the_pipeline(dsas_pipe):
    from dsas_diffusion import Steering, SteeringConfig
    from dsas_diffusion.core import Gate, MeanShift

    name = "model.layers.0"
    foreign = Steering(SteeringConfig(method="mean_shift", layers={name: {"width": 32}}),
                       {name: MeanShift(shift=torch.zeros(32))},
                       {name: Gate(weight=torch.zeros(32), bias=torch.zeros(()), accuracy=1.0)})
    with pytest.raises(ValueError, match="outside the text encoders and unet.*language model"):
        dsas_pipe.set_steering(foreign)
