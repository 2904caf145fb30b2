"""Every supported family (SDXL, PixArt-Σ, SD3, FLUX; SD 1.x in the other files), stock and named,
against the stock pipeline as oracle: off / strength 0 / removed are bit-identical to stock, the
stock pipeline with `apply_dsas` equals the named one, the gates fire on the concept, the image
stream is steered, save / load round trips, and the negative branch is left alone unless asked."""

import numpy as np
import pytest
import torch

import dsas_diffusion as dsas
from dsas_diffusion import Steering, apply_dsas, remove_dsas

from tests.conftest import CONCEPT_CONTROL, CONCEPT_SOURCE, CONCEPT_TARGET
from tests.diffusion.tiny_pipelines import CALL_KWARGS, tiny_components, tiny_pipeline

NAMED = {"stable_diffusion_xl": dsas.DSASStableDiffusionXLPipeline, "pixart_sigma": dsas.DSASPixArtSigmaPipeline,
         "stable_diffusion_3": dsas.DSASStableDiffusion3Pipeline, "flux": dsas.DSASFluxPipeline}
FAMILIES = tuple(NAMED)
PROMPTS = ["a photo of a banana on a table", "a cute fish in the sea"]
HELD_OUT_SOURCE = ["a banana on the road", "a cute banana near a tree", "a photo of a banana in the snow"]
HELD_OUT_CONTROL = ["a photo of a cow on the road", "a cute rabbit near a tree", "a photo of a train in the snow"]
# (H', W') of the denoiser's default layers at CALL_KWARGS' sizes: SDXL's cross-attention sits below one
# UNet downsampling of a 16 x 16 latent; SD3 patchifies 16 x 16 latents 2 x 2; FLUX packs them 2 x 2; PixArt
# patchifies 8 x 8 latents 2 x 2
GRIDS = {"stable_diffusion_xl": (8, 8), "pixart_sigma": (4, 4), "stable_diffusion_3": (8, 8), "flux": (8, 8)}


def call_kwargs(family):
    return {**CALL_KWARGS[family], "num_inference_steps": 2}


def pipeline_kwargs(family):
    """What the tiny pipelines need beyond size and steps, for fitting too."""
    return {k: v for k, v in CALL_KWARGS[family].items() if k in ("use_resolution_binning", "clean_caption")} or None


def run(pipe, family, prompt=PROMPTS, **kw):
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **{**call_kwargs(family), **kw})


def named_pipeline(family):
    pipe = NAMED[family](**tiny_components(family))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def fitted(family) -> Steering:
    # Random tiny encoders spread every word over its own direction: a PCA rank of 10 lets the gate see the concept
    return named_pipeline(family).fit_steering(
        CONCEPT_SOURCE, CONCEPT_TARGET, CONCEPT_CONTROL, method="mean_shift", pca_rank=10, num_inference_steps=1,
        batch_size=12, height=CALL_KWARGS[family]["height"], width=CALL_KWARGS[family]["width"], progress=False,
        pipeline_kwargs=pipeline_kwargs(family))


@pytest.fixture(scope="module")
def stock(family):
    """(images, hooks) of a stock pipeline after a call: transformers 5 adds hooks to record hidden states."""
    pipe = tiny_pipeline(family)
    return run(pipe, family).images, hooks(pipe)


@pytest.fixture(scope="module")
def steered(family, fitted):
    """The named pipeline with the fitted steering set, and its output for one prompt, two images."""
    pipe = named_pipeline(family)
    pipe.set_steering(fitted)
    return pipe, run(pipe, family, PROMPTS[:1], num_images_per_prompt=2)


def hooks(pipe) -> list:
    """Every forward hook of the pipeline's modules, and every method wrapped on the pipeline object."""
    return [(name, sub, len(m._forward_hooks), len(m._forward_pre_hooks)) for name, module in pipe.components.items()
            if isinstance(module, torch.nn.Module) for sub, m in module.named_modules()] + \
        [k for k in ("check_inputs", "encode_prompt", "maybe_free_model_hooks", "_dsas_integration") if k in vars(pipe)]


def test_fit_covers_every_text_encoder_and_the_denoiser(family, fitted):
    pipe = tiny_pipeline(family)
    components = {n.split(".")[0] for n in fitted.layers}
    encoders = {te for te in ("text_encoder", "text_encoder_2", "text_encoder_3")
                if getattr(pipe, te, None) is not None}
    assert components == encoders | {"transformer" if family != "stable_diffusion_xl" else "unet"}
    assert set(fitted.config.fingerprint) == components
    assert fitted.steered_layers


def test_zero_strength_and_no_steering_are_bit_identical_to_stock(family, fitted, stock):
    stock_images, stock_hooks = stock
    pipe = named_pipeline(family)
    pipe.set_steering(fitted)
    off = run(pipe, family, steering_strength=0)
    assert np.array_equal(off.images, stock_images) and off.steering_scales is None
    pipe.set_steering(None)
    assert hooks(pipe) == stock_hooks
    assert np.array_equal(run(pipe, family).images, stock_images)


def test_apply_on_stock_equals_named_and_remove_restores_it(family, fitted, stock, steered):
    stock_images, stock_hooks = stock
    _, expected = steered
    pipe = tiny_pipeline(family)
    applied = apply_dsas(pipe, fitted)
    images = run(pipe, family, PROMPTS[:1], num_images_per_prompt=2).images
    assert np.array_equal(images, expected.images) and not np.array_equal(images[:1], stock_images[:1])
    assert applied.scales.keys() == expected.steering_scales.keys()
    assert all(torch.equal(applied.scales[k], v) for k, v in expected.steering_scales.items())
    with pytest.raises(ValueError, match="already applied.*remove_dsas"):
        apply_dsas(pipe, fitted)
    remove_dsas(pipe)
    assert hooks(pipe) == stock_hooks
    assert np.array_equal(run(pipe, family).images, stock_images)


def test_gates_fire_on_concept_prompts_more_than_on_control_prompts(family, fitted, steered):
    pipe, _ = steered
    scales = run(pipe, family, HELD_OUT_SOURCE + HELD_OUT_CONTROL, num_inference_steps=1).steering_scales
    for te in {n.split(".")[0] for n in fitted.steered_layers if n.startswith("text_encoder")}:
        first = next(n for n in fitted.steered_layers if n.startswith(f"{te}."))  # later layers read steered input
        decision = scales[first][:, -1]  # a padding position: the sequence's decision
        assert decision[:3].mean() > decision[3:].mean() + 0.2, (first, decision)


def test_denoiser_lambdas_cover_the_latent_grid(family, fitted, steered):
    _, out = steered
    denoiser = [n for n in fitted.layers if not n.startswith("text_encoder")]
    shown = [n for n in denoiser if n in out.steering_scales]
    assert shown == [n for n in denoiser if n in fitted.steered_layers]
    for name in shown:
        assert tuple(out.steering_scales[name].shape) == (2, 2, *GRIDS[family]), name  # steps, images, H', W'
    text = [n for n in out.steering_scales if n.startswith("text_encoder")]
    assert text and all(out.steering_scales[n].shape[0] == 1 for n in text)  # one prompt


@pytest.mark.parametrize("family_", ["stable_diffusion_3", "flux"])
def test_joint_attention_steers_the_image_stream_only(family_):
    """SD3 / FLUX joint attention returns (image, text): the image tokens change, the text tokens do not."""
    pipe = tiny_pipeline(family_)
    layer = "transformer_blocks.0.attn"
    steering = _steering_on(pipe, f"transformer.{layer}", width=pipe.transformer.inner_dim)
    outputs = []
    pipe.transformer.get_submodule(layer).register_forward_hook(lambda m, a, out: outputs.append(out))
    run(pipe, family_, PROMPTS[:1], num_inference_steps=1)
    applied = apply_dsas(pipe, steering, check_model=False)
    run(pipe, family_, PROMPTS[:1], num_inference_steps=1)
    (image, text), (steered_image, steered_text) = outputs[0], outputs[-1]
    assert torch.equal(text, steered_text) and not torch.equal(image, steered_image)
    assert tuple(applied.scales[f"transformer.{layer}"].shape) == (1, 1, 8, 8)


def test_save_load_gives_identical_images(family, fitted, steered, tmp_path):
    _, expected = steered
    fitted.save_pretrained(tmp_path / "steering")
    pipe = named_pipeline(family)
    pipe.set_steering(tmp_path / "steering")
    assert np.array_equal(run(pipe, family, PROMPTS[:1], num_images_per_prompt=2).images, expected.images)


def test_negative_branch_is_untouched_unless_asked(family, fitted):
    """The denoiser's first call sees the same latents steered or not: its negative branch (inputs and
    outputs) is the stock one, unless steer_negative."""
    cfg = {"negative_prompt": "a dark photo"} | ({"true_cfg_scale": 2.0} if family == "flux" else {})

    def first_step(pipe, **kw):
        calls = []
        handles = [pipe.components[n].register_forward_hook(
            lambda m, args, kwargs, out: calls.append((args, kwargs, out)), with_kwargs=True)
            for n in ("unet", "transformer") if n in pipe.components]
        run(pipe, family, PROMPTS[:1], num_inference_steps=1, **cfg, **kw)
        for h in handles:
            h.remove()
        if family == "flux":  # a second transformer call, under cache_context("uncond")
            (_, pos_kw, pos_out), (_, neg_kw, neg_out) = calls[:2]
            return neg_kw["encoder_hidden_states"], neg_out[0], pos_out[0]
        args, kwargs, out = calls[0]
        embeds, noise = kwargs["encoder_hidden_states"], out[0]
        return embeds[:1], noise[:1], noise[1:]

    pipe = named_pipeline(family)
    stock = first_step(pipe)
    pipe.set_steering(fitted)
    steered = first_step(pipe)
    assert torch.equal(steered[0], stock[0]) and torch.equal(steered[1], stock[1])  # negative: embeddings, output
    assert not torch.equal(steered[2], stock[2])  # positive: steered
    both = first_step(pipe, steer_negative=True)
    assert not torch.equal(both[0], stock[0]) and not torch.equal(both[1], stock[1])


@pytest.mark.parametrize("ran_before", [False, True])
def test_sdxl_penultimate_hidden_state_is_steered_whatever_ran_before(ran_before):
    """SDXL reads CLIP's hidden_states[-2], which transformers 5 records with hooks installed at the first
    forward: a steering of that layer reaches the prompt embeddings whether the encoder ran before or not."""
    pipe = tiny_pipeline("stable_diffusion_xl")

    def embeds():
        return pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)[0]

    stock = embeds() if ran_before else tiny_pipeline("stable_diffusion_xl").encode_prompt(
        PROMPTS, device="cpu", do_classifier_free_guidance=False)[0]
    layer = "text_encoder.encoder.layers.2"  # of 4: hidden_states[-2] is its output
    apply_dsas(pipe, _steering_on(pipe, layer, width=32, kind="tokens"), check_model=False)
    steered = embeds()
    width = pipe.text_encoder.config.hidden_size  # the prompt embeddings are both encoders' states side by side
    assert not torch.equal(steered[..., :width], stock[..., :width])
    assert torch.equal(steered[..., width:], stock[..., width:])  # text_encoder_2 untouched


def test_sdxl_pooled_embedding_follows_the_steering_of_text_encoder_2():
    """The pooled embedding is text_encoder_2's projection of its EOS token after the last layer: a steering
    of that encoder's layers reaches it through the EOS position (with that position's own lambda)."""
    pipe = tiny_pipeline("stable_diffusion_xl")
    pooled = lambda: pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)[2]  # noqa: E731
    stock = pooled()
    apply_dsas(pipe, _steering_on(pipe, "text_encoder_2.text_model.encoder.layers.3", width=32, kind="tokens"),
               check_model=False)
    assert not torch.equal(pooled(), stock)


def test_sd3_skip_layer_guidance_forwards_are_steered_and_not_recorded():
    """SD3's skip-layer guidance adds a positive-only forward of another batch size at some steps."""
    pipe = tiny_pipeline("stable_diffusion_3")
    kw = dict(num_inference_steps=3, skip_guidance_layers=[1], skip_layer_guidance_start=0.0,
              skip_layer_guidance_stop=1.0)
    stock = run(pipe, "stable_diffusion_3", PROMPTS[:1], **kw).images
    layer = "transformer.transformer_blocks.0.attn"
    applied = apply_dsas(pipe, _steering_on(pipe, layer, width=pipe.transformer.inner_dim), strength=0.0,
                         check_model=False)
    assert np.array_equal(run(pipe, "stable_diffusion_3", PROMPTS[:1], **kw).images, stock)
    applied.strength = 1.0
    assert not np.array_equal(run(pipe, "stable_diffusion_3", PROMPTS[:1], **kw).images, stock)
    assert tuple(applied.scales[layer].shape) == (3, 1, 8, 8)  # one map per step, of the CFG batch's positive half


def _steering_on(pipe, layer: str, width: int, kind: str = "spatial") -> Steering:
    """A plain mean shift of 1 on one layer, its gate always on (for checking where it acts)."""
    from dsas_diffusion import SteeringConfig
    from dsas_diffusion.core import Gate, MeanShift

    config = SteeringConfig(method="mean_shift", layers={layer: {"width": width, "kind": kind, "gate_accuracy": 1.0}})
    return Steering(config, {layer: MeanShift(shift=torch.ones(width))},
                    {layer: Gate(weight=torch.zeros(width), bias=torch.full((), 10.0), accuracy=1.0)})


def test_remove_dsas_on_a_named_pipeline_forgets_its_set_steering():
    """remove_dsas on a named pipeline is set_steering(None): it left `pipe.steering` set, calls unsteered, and every
    later set_steering refused with "not applied to this pipeline"."""
    pipe = named_pipeline("pixart_sigma")
    before = hooks(pipe)
    steering = _steering_on(pipe, "transformer.transformer_blocks.0.attn2", width=pipe.transformer.inner_dim)
    pipe.set_steering(steering, check_model=False)
    remove_dsas(pipe)
    assert pipe.steering is None and hooks(pipe) == before
    pipe.set_steering(steering, check_model=False)
    assert pipe.steering is steering and dsas.diffusion.integration.applied_to(pipe)
    pipe.set_steering(None)
    assert hooks(pipe) == before


def test_apply_dsas_refuses_a_named_pipeline_and_remove_dsas_what_is_no_pipeline():
    """A steering applied with apply_dsas to a named pipeline escaped its calls' own switch (steering_strength=0
    still steered); it goes through set_steering instead."""
    pipe = named_pipeline("pixart_sigma")
    steering = _steering_on(pipe, "transformer.transformer_blocks.0.attn2", width=pipe.transformer.inner_dim)
    with pytest.raises(ValueError, match=r"DSASPixArtSigmaPipeline is a DSAS pipeline.*pipe\.set_steering\(steering\)"):
        apply_dsas(pipe, steering, check_model=False)
    assert "_dsas_integration" not in vars(pipe)
    with pytest.raises(TypeError, match="remove_dsas takes the diffusers pipeline.*got object"):
        remove_dsas(object())


def test_flux_true_cfg_with_one_tensor_for_both_prompts_steers_the_positive_branch():
    """The negative branch was told apart by the identity of its embeddings: the same tensor given as prompt_embeds and
    negative_prompt_embeds switched the positive branch off too. Now the order tells (positive first), and a copy of
    the tensor gives the same images and lambdas."""
    pipe = tiny_pipeline("flux")
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(["a banana on the beach"], None, device="cpu")
    layer = "transformer.transformer_blocks.0.attn"
    steering = _steering_on(pipe, layer, width=pipe.transformer.inner_dim)

    def call(negative, negative_pooled):
        return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative,
                    negative_pooled_prompt_embeds=negative_pooled, true_cfg_scale=2.0,
                    generator=torch.Generator().manual_seed(0), **call_kwargs("flux")).images

    stock = call(embeds, pooled)
    applied = apply_dsas(pipe, steering, check_model=False)
    same = call(embeds, pooled)
    same_scales = applied.scales[layer]
    copied = call(embeds.clone(), pooled.clone())
    assert np.array_equal(same, copied) and not np.array_equal(same, stock)
    assert same_scales.shape[0] == 2 and torch.equal(same_scales, applied.scales[layer])  # one map per step, positive
