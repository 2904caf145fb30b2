"""Oracle: with steering off, or every scale at zero, images are bit-identical to stock diffusers."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from tests.conftest import CONCEPT_SOURCE

KW = dict(num_inference_steps=3, output_type="np")


@pytest.fixture
def stock(sd_dir):
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, prompt, seed=0, **kw):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **{**KW, **kw})


def no_hooks(pipe):
    return all(not m._forward_hooks and not m._forward_pre_hooks
               for c in (pipe.text_encoder, pipe.unet) for m in c.modules())


@pytest.mark.parametrize("call", [
    dict(),
    dict(negative_prompt=["blurry", "dark"], num_images_per_prompt=2),
    dict(guidance_scale=1.0),
    dict(guidance_rescale=0.7),  # clip_skip fails in stock diffusers 0.42 with transformers 5 (no .text_model)
])
def test_no_steering_and_zero_strength_are_bit_identical_to_stock(stock, dsas_pipe, fitted_steering, call):
    prompt = [CONCEPT_SOURCE[0], "a photo of a dog"]
    expected = run(stock, prompt, **call).images
    assert np.array_equal(run(dsas_pipe, prompt, **call).images, expected)
    dsas_pipe.set_steering(fitted_steering)
    out = run(dsas_pipe, prompt, steering_strength=0.0, **call)
    assert np.array_equal(out.images, expected) and out.steering_scales is None
    assert not np.array_equal(run(dsas_pipe, prompt, **call).images, expected)  # steering really acts
    # between calls the hooks are inactive: the components alone behave like stock ones
    ids = stock.tokenizer(prompt, padding="max_length", return_tensors="pt").input_ids
    assert torch.equal(dsas_pipe.text_encoder(ids)[0], stock.text_encoder(ids)[0])
    dsas_pipe.set_steering(None)
    assert no_hooks(dsas_pipe)
    assert np.array_equal(run(dsas_pipe, prompt, **call).images, expected)


def test_all_lambdas_zero_runs_every_hook_and_is_still_bit_identical(stock, dsas_pipe, fitted_steering):
    # a floor just under 1 snaps every lambda to exactly 0 while all hooks run and record
    steering = type(fitted_steering)(fitted_steering.config, fitted_steering.maps, fitted_steering.gates,
                                     fitted_steering.probes)
    steering.config = type(fitted_steering.config)(**{**fitted_steering.config.__dict__, "lambda_floor": 0.9999999})
    dsas_pipe.set_steering(steering)
    prompt = [CONCEPT_SOURCE[0], "a photo of a dog"]
    out = run(dsas_pipe, prompt)
    assert out.steering_scales and all((v == 0).all() for v in out.steering_scales.values())
    assert np.array_equal(out.images, run(stock, prompt).images)


def test_prompt_embeds_input_matches_stock(stock, dsas_pipe):
    embeds, _ = stock.encode_prompt("a red circle", "cpu", 1, False)
    expected = stock(prompt_embeds=embeds, generator=torch.Generator().manual_seed(0), **KW).images
    got = dsas_pipe(prompt_embeds=embeds, generator=torch.Generator().manual_seed(0), **KW).images
    assert np.array_equal(got, expected)


def test_return_dict_false_keeps_the_stock_tuple(stock, dsas_pipe, fitted_steering):
    dsas_pipe.set_steering(fitted_steering)
    images, nsfw = dsas_pipe("a photo of a dog", generator=torch.Generator().manual_seed(0), return_dict=False,
                             steering_strength=0, **KW)
    assert np.array_equal(images, run(stock, "a photo of a dog").images) and nsfw is None
