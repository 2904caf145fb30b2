"""fit_steering -> save -> load -> generate, with lambdas that separate concept from control prompts."""

import numpy as np
import pytest
import torch

from dsas_diffusion import DSASStableDiffusionPipeline, Steering

from tests.conftest import CONCEPT_CONTROL, CONCEPT_SOURCE, CONCEPT_TARGET

KW = dict(num_inference_steps=3, output_type="np")
HELD_OUT_SOURCE = ["a banana on the road", "a cute banana near a tree", "a photo of a banana in the snow"]
HELD_OUT_CONTROL = ["a photo of a cow on the road", "a cute rabbit near a tree", "a photo of a train in the snow"]


@pytest.fixture(scope="module")
def te_steering(sd_dir):
    # Random tiny encoders spread every word over its own random direction, so the concept is not among
    # the top 5 principal components as it is in trained encoders: a rank of 10 (of 32) lets the gate see it.
    pipe = DSASStableDiffusionPipeline.from_pretrained(sd_dir)
    return pipe.fit_steering(CONCEPT_SOURCE, CONCEPT_TARGET, CONCEPT_CONTROL, method="linear_act", steer="both",
                             pca_rank=10, num_inference_steps=3, progress=False)


def test_fit_reports_layers_and_fingerprints(te_steering):
    assert te_steering.steered_layers
    assert {n.split(".")[0] for n in te_steering.layers} == {"text_encoder", "unet"}
    assert set(te_steering.config.fingerprint) == {"text_encoder", "unet"}
    assert te_steering.config.num_examples == {"source": 12, "target": 12, "control": 12}
    assert "gate acc" in te_steering.report()


def test_text_encoder_lambdas_high_on_concept_low_on_control(dsas_pipe, te_steering):
    dsas_pipe.set_steering(te_steering)
    out = dsas_pipe(HELD_OUT_SOURCE + HELD_OUT_CONTROL, generator=torch.Generator().manual_seed(0), **KW)
    first = "text_encoder.encoder.layers.0"  # later layers read activations the first one already steered
    assert first in te_steering.steered_layers
    lam = out.steering_scales[first]
    assert lam.shape == (6, 77)
    ids = dsas_pipe.tokenizer(HELD_OUT_SOURCE, padding="max_length", return_tensors="pt").input_ids
    at_concept = lam[:3][ids == dsas_pipe.tokenizer.convert_tokens_to_ids("banana</w>")]
    assert at_concept.min() > 0.9, at_concept
    sequence_decision = lam[:, -1]  # padding positions take the sequence-level decision
    # every held-out prompt is decided right, with a clear margin between the two groups
    assert sequence_decision[:3].min() > 0.7 and sequence_decision[3:].max() < 0.5, sequence_decision
    assert sequence_decision[:3].min() - sequence_decision[3:].max() > 0.4, sequence_decision
    assert all((v[:, 0] == 0).all() for k, v in out.steering_scales.items() if k.startswith("text_encoder"))  # BOS


def test_unet_lambdas_are_maps_over_the_image(dsas_pipe, te_steering):
    dsas_pipe.set_steering(te_steering)
    out = dsas_pipe(HELD_OUT_SOURCE[:2], num_images_per_prompt=2, generator=torch.Generator().manual_seed(0), **KW)
    unet = {k: v for k, v in out.steering_scales.items() if k.startswith("unet")}
    for name, v in unet.items():
        assert v.dim() == 4 and v.shape[:2] == (3, 4), (name, v.shape)  # steps, prompts x images, H, W
        assert 0 <= v.min() and v.max() <= 1


def test_save_load_generates_identical_images(tmp_path, dsas_pipe, te_steering):
    te_steering.save_pretrained(tmp_path / "no-banana")
    dsas_pipe.set_steering(te_steering)
    a = dsas_pipe(HELD_OUT_SOURCE[0], generator=torch.Generator().manual_seed(0), **KW).images
    dsas_pipe.set_steering(tmp_path / "no-banana")
    b = dsas_pipe(HELD_OUT_SOURCE[0], generator=torch.Generator().manual_seed(0), **KW).images
    assert isinstance(dsas_pipe.steering, Steering) and np.array_equal(a, b)


def test_dsas_leaves_control_prompts_closer_than_plain_steering(dsas_pipe, te_steering):
    dsas_pipe.set_steering(te_steering)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    base = dsas_pipe(HELD_OUT_CONTROL, steering_strength=0, generator=gen(), **KW).images
    dsas = dsas_pipe(HELD_OUT_CONTROL, generator=gen(), **KW).images
    plain = dsas_pipe(HELD_OUT_CONTROL, gated=False, generator=gen(), **KW).images
    assert np.abs(dsas - base).mean() < 0.5 * np.abs(plain - base).mean()


@pytest.mark.parametrize("method", ["mean_shift", "mean_act", "iti"])
def test_every_method_fits_and_runs(sd_dir, method):
    pipe = DSASStableDiffusionPipeline.from_pretrained(sd_dir)
    pipe.set_progress_bar_config(disable=True)
    steering = pipe.fit_steering(CONCEPT_SOURCE, CONCEPT_TARGET, CONCEPT_CONTROL, method=method, steer="text_encoder",
                                 pca_rank=10, progress=False)
    assert steering.config.method == method and all(n.startswith("text_encoder.") for n in steering.layers)
    pipe.set_steering(steering)
    img = pipe(HELD_OUT_SOURCE[0], generator=torch.Generator().manual_seed(0), **KW).images
    assert np.isfinite(img).all()


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler",
                                       "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DDPMScheduler"])
def test_schedulers_keep_working(dsas_pipe, fitted_steering, scheduler):
    import diffusers

    dsas_pipe.scheduler = getattr(diffusers, scheduler).from_config(dsas_pipe.scheduler.config)
    dsas_pipe.set_steering(fitted_steering)
    out = dsas_pipe(HELD_OUT_SOURCE[0], generator=torch.Generator().manual_seed(0), output_type="np",
                    num_inference_steps=4)  # PNDM needs at least 4 steps, stock or not
    assert np.isfinite(out.images).all() and out.steering_scales


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_working(sd_dir, fitted_steering, dtype):
    pipe = DSASStableDiffusionPipeline.from_pretrained(sd_dir, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.set_steering(fitted_steering)
    out = pipe(HELD_OUT_SOURCE[0], generator=torch.Generator().manual_seed(0), **KW)
    assert np.isfinite(out.images).all()
    assert all(torch.isfinite(v).all() for v in out.steering_scales.values())


def test_negative_branch_is_not_steered_unless_asked(dsas_pipe, fitted_steering):
    dsas_pipe.set_steering(fitted_steering)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = dsas_pipe(HELD_OUT_SOURCE[0], negative_prompt=HELD_OUT_SOURCE[1], generator=gen(), **KW).images
    b = dsas_pipe(HELD_OUT_SOURCE[0], negative_prompt=HELD_OUT_SOURCE[1], steer_negative=True, generator=gen(), **KW).images
    assert not np.array_equal(a, b)


def test_fitting_ignores_a_steering_already_set_on_the_pipeline(dsas_pipe, fitted_steering):
    kwargs = dict(method="mean_shift", num_inference_steps=2, pca_rank=10, progress=False)
    fresh = dsas_pipe.fit_steering(CONCEPT_SOURCE, CONCEPT_TARGET, CONCEPT_CONTROL, **kwargs)
    dsas_pipe.set_steering(fitted_steering)
    again = dsas_pipe.fit_steering(CONCEPT_SOURCE, CONCEPT_TARGET, CONCEPT_CONTROL, **kwargs)
    for name in fresh.layers:
        assert torch.equal(fresh.maps[name].shift, again.maps[name].shift), name
        assert torch.equal(fresh.gates[name].weight, again.gates[name].weight), name
