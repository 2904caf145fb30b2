"""DSAS composes with diffusers' own tools: LoRA adapters (peft), model CPU offload, group offloading,
layerwise casting, a caching hook (first-block cache) and torch.compile on a DiT, each against the same
tool without steering."""

import numpy as np
import pytest
import torch

from dsas_diffusion import DSASStableDiffusionPipeline, Steering, SteeringConfig, apply_dsas, remove_dsas
from dsas_diffusion.core import Gate, MeanShift

from tests.diffusion.tiny_pipelines import CALL_KWARGS, tiny_pipeline

KW = dict(num_inference_steps=2, output_type="np")
PROMPT = "a photo of a banana on a table"


def run(pipe, **kw):
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **{**KW, **kw})


def test_a_steering_fitted_without_lora_is_accepted_with_one_loaded(dsas_pipe, fitted_steering):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)  # init_lora_weights=False: random adapters, which change the images
    dsas_pipe.unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                               target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    # transformers 5's own add_adapter wants a peft newer than any released: peft's functional API instead
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                                 target_modules=["q_proj", "v_proj"]), dsas_pipe.text_encoder)
    with_lora = run(dsas_pipe).images
    dsas_pipe.set_steering(fitted_steering)  # the fingerprint reads the base weights under the adapters
    assert np.array_equal(run(dsas_pipe, steering_strength=0).images, with_lora)
    # random adapters move the activations far from the fitted gates' concept side: plain steering shows it acts
    steered = run(dsas_pipe, gated=False)
    assert not np.array_equal(steered.images, with_lora) and steered.steering_scales


def test_a_lora_fused_into_the_weights_is_another_checkpoint(dsas_pipe, fitted_steering):
    with torch.no_grad():
        dsas_pipe.unet.conv_in.weight.mul_(1.5)  # what fusing changes: the base weights themselves
    with pytest.raises(ValueError, match="other weights"):
        dsas_pipe.set_steering(fitted_steering)


def test_model_cpu_offload_gives_the_same_images(sd_dir, dsas_pipe, fitted_steering):
    dsas_pipe.set_steering(fitted_steering)
    expected = run(dsas_pipe)
    pipe = DSASStableDiffusionPipeline.from_pretrained(sd_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_model_cpu_offload(device="cpu")  # accelerate's hooks, as on a GPU machine
    pipe.set_steering(fitted_steering)
    out = run(pipe)
    assert np.array_equal(out.images, expected.images)
    assert all(torch.equal(out.steering_scales[k], v) for k, v in expected.steering_scales.items())


def test_layerwise_casting_gives_the_stock_images_at_strength_zero(sd_dir, dsas_pipe, fitted_steering):
    from diffusers import StableDiffusionPipeline

    stock = StableDiffusionPipeline.from_pretrained(sd_dir)
    stock.set_progress_bar_config(disable=True)
    dsas_pipe.set_steering(fitted_steering)  # before casting: the fingerprint reads full-precision weights
    for pipe in (stock, dsas_pipe):
        pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    expected = run(stock).images
    assert np.array_equal(run(dsas_pipe, steering_strength=0).images, expected)
    steered = run(dsas_pipe)
    assert np.isfinite(steered.images).all() and not np.array_equal(steered.images, expected)


def test_first_block_cache_on_a_dit_gives_the_cached_stock_images_once_removed():
    from diffusers import FirstBlockCacheConfig

    pipe = tiny_pipeline("flux")
    kw = {**CALL_KWARGS["flux"], "num_inference_steps": 3}
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    cached = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images
    layer = "transformer.transformer_blocks.1.attn"  # after the first block: skipped on cached steps
    applied = apply_dsas(pipe, _always_on(layer, pipe.transformer.inner_dim), strength=0.0, check_model=False)
    assert np.array_equal(pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images, cached)
    applied.strength = 1.0
    steered = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images
    assert not np.array_equal(steered, cached)
    assert 1 <= applied.scales[layer].shape[0] <= 3  # one lambda map per step the block really ran
    remove_dsas(pipe)
    assert np.array_equal(pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images, cached)


def test_group_offloading_gives_the_same_images():
    pipe = tiny_pipeline("pixart_sigma")
    kw = {**CALL_KWARGS["pixart_sigma"], "num_inference_steps": 2}
    layer = "transformer.transformer_blocks.1.attn2"
    applied = apply_dsas(pipe, _always_on(layer, pipe.transformer.inner_dim), check_model=False)
    expected = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images
    scales = applied.scales
    pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_type="block_level",
                                          num_blocks_per_group=1)
    assert np.array_equal(pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images, expected)
    assert torch.equal(applied.scales[layer], scales[layer])


def test_a_dit_compiled_after_set_steering_matches_eager_without_graph_breaks():
    """FLUX with true CFG: the negative branch's forwards switch the steering off from outside the graph."""
    from dsas_diffusion import DSASFluxPipeline
    from tests.diffusion.tiny_pipelines import tiny_components
    from tests.graph_counts import counting

    pipe = DSASFluxPipeline(**tiny_components("flux"))
    pipe.set_progress_bar_config(disable=True)
    pipe.set_steering(_always_on("transformer.transformer_blocks.0.attn", pipe.transformer.inner_dim),
                      check_model=False)
    kw = {**CALL_KWARGS["flux"], "num_inference_steps": 2, "negative_prompt": "a dark photo", "true_cfg_scale": 2.0}
    eager = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images
    torch._dynamo.reset()
    try:
        with counting() as seen:
            pipe.transformer.compile(backend=seen.backend)
            compiled = [pipe(PROMPT, generator=torch.Generator().manual_seed(0), steering_strength=alpha, **kw).images
                        for alpha in (1.0, 0.5, 0.0)]
    finally:
        torch._dynamo.reset()
    np.testing.assert_allclose(compiled[0], eager, atol=1e-5)
    assert not seen.breaks and seen.graphs <= 2, seen  # the positive and the negative branch


def _always_on(layer: str, width: int) -> Steering:
    config = SteeringConfig(method="mean_shift", layers={layer: {"width": width, "kind": "spatial",
                                                                 "gate_accuracy": 1.0}})
    return Steering(config, {layer: MeanShift(shift=torch.ones(width))},
                    {layer: Gate(weight=torch.zeros(width), bias=torch.full((), 10.0), accuracy=1.0)})
