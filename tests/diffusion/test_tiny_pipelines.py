"""The tiny stock pipelines work offline, and the facts steering relies on hold for them (issue 13,
"Facts measured"): which element of a DiT block's output is the image stream, the token grid, how
each family calls its text encoders, and how classifier-free guidance is laid out."""

import runpy

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from transformers import T5TokenizerFast

from tests.conftest import ASSETS, CONCEPT_CONTROL, CONCEPT_SOURCE, CONCEPT_TARGET
from tests.diffusion.tiny_pipelines import (CALL_KWARGS, FAMILIES, T5_TOKENIZER_DIR, pipeline_class,
                                            save_tiny_pipeline, tiny_components, tiny_pipeline)

PROMPTS = ["a photo of a banana on a table", "a cute fish in the sea"]


def run(pipe, family, prompt=PROMPTS, seed=0, **kw):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **{**CALL_KWARGS[family], **kw}).images


def record(module, into: list, pre=False):
    """Append each call's output (or, with pre, its keyword arguments and positional shapes) to `into`."""
    if pre:
        return module.register_forward_pre_hook(lambda m, args, kwargs: into.append((args, kwargs)), with_kwargs=True)
    return module.register_forward_hook(lambda m, args, out: into.append(out))


def test_t5_tokenizer_is_rebuilt_byte_for_byte(tmp_path):
    runpy.run_path(str(ASSETS / "build_tiny_t5_tokenizer.py"))["build"](tmp_path)
    shipped = sorted(p.name for p in T5_TOKENIZER_DIR.iterdir())
    assert shipped == sorted(p.name for p in tmp_path.iterdir())
    for name in shipped:
        assert (tmp_path / name).read_bytes() == (T5_TOKENIZER_DIR / name).read_bytes(), name


def test_t5_tokenizer_gives_each_test_word_its_own_token_and_matches_the_t5_config():
    tokenizer = T5TokenizerFast.from_pretrained(T5_TOKENIZER_DIR)
    config = tiny_components("pixart_sigma")["text_encoder"].config
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (config.pad_token_id, config.eos_token_id) == (0, 1)
    assert len(tokenizer) == config.vocab_size
    words = sorted({w for p in CONCEPT_SOURCE + CONCEPT_TARGET + CONCEPT_CONTROL for w in p.split()})
    ids = tokenizer(" ".join(words)).input_ids
    assert ids[-1] == tokenizer.eos_token_id and len(set(ids[:-1])) == len(words) == len(ids) - 1
    assert tokenizer.unk_token_id not in ids
    batch = tokenizer(PROMPTS, padding="max_length", max_length=12)
    assert batch.input_ids[1] == tokenizer("a cute fish in the sea").input_ids + [tokenizer.pad_token_id] * 5
    assert batch.attention_mask[1] == [1] * 7 + [0] * 5
    unknown = tokenizer("a zebra").input_ids  # falls back to characters, never to <unk>
    assert tokenizer.unk_token_id not in unknown and len(unknown) == 1 + 1 + 5 + 1


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_call_is_seeded_and_follows_the_prompt(family):
    pipe = tiny_pipeline(family)
    assert type(pipe) is pipeline_class(family)
    images = run(pipe, family)
    size = CALL_KWARGS[family]["height"]
    assert images.shape == (2, size, size, 3) and np.isfinite(images).all()
    assert np.array_equal(run(pipe, family), images)
    assert not np.array_equal(run(pipe, family, prompt=PROMPTS[::-1]), images)  # the text reaches the image
    assert not np.array_equal(run(tiny_pipeline(family, seed=1), family), images)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_folder_loads_as_the_same_stock_pipeline(family, tmp_path):
    pipe = tiny_pipeline(family)
    loaded = DiffusionPipeline.from_pretrained(save_tiny_pipeline(family, tmp_path))
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe)
    assert np.array_equal(run(loaded, family), run(pipe, family))


def token_grid(pipe, family):
    """Image tokens per side seen by the denoiser at CALL_KWARGS' size."""
    latent = CALL_KWARGS[family]["height"] // pipe.vae_scale_factor
    return latent // (2 if family == "flux" else pipe.transformer.config.patch_size)


def test_flux_packs_latents_2x2_so_its_grid_is_height_over_twice_the_vae_factor():
    pipe = tiny_pipeline("flux")
    calls = []
    record(pipe.transformer, calls, pre=True)
    run(pipe, "flux", prompt=PROMPTS[:1], num_inference_steps=1)
    (_, kwargs), = calls
    grid = CALL_KWARGS["flux"]["height"] // (pipe.vae_scale_factor * 2)
    assert pipe.vae_scale_factor == 2 and pipe.transformer.config.patch_size == 1 and grid == 8
    assert kwargs["hidden_states"].shape == (1, grid * grid, pipe.transformer.config.in_channels)
    assert kwargs["img_ids"].shape == (grid * grid, 3)


@pytest.mark.parametrize("family", ["stable_diffusion_3", "flux"])
def test_joint_blocks_return_text_then_image_and_their_attention_image_then_text(family):
    pipe = tiny_pipeline(family)
    blocks, attns, singles, single_attns, text = [], [], [], [], []
    for block in pipe.transformer.transformer_blocks:
        record(block, blocks)
        record(block.attn, attns)
    for block in getattr(pipe.transformer, "single_transformer_blocks", []):
        record(block, singles)
        record(block.attn, single_attns)
    record(pipe.transformer, text, pre=True)
    run(pipe, family, prompt=PROMPTS[:1], num_inference_steps=1)
    image_tokens = token_grid(pipe, family) ** 2
    text_tokens = text[0][1]["encoder_hidden_states"].shape[1]
    assert text_tokens != image_tokens  # otherwise the shapes below could not tell the streams apart
    width = pipe.transformer.inner_dim
    last = len(pipe.transformer.transformer_blocks) - 1
    for i, (out, attn) in enumerate(zip(blocks, attns)):
        assert isinstance(out, tuple) and out[1].shape[1:] == (image_tokens, width)  # element 1: image
        if family == "stable_diffusion_3" and i == last:
            assert out[0] is None  # context_pre_only: the last SD3 block drops the text stream
        else:
            assert out[0].shape[1:] == (text_tokens, width)
        assert attn[0].shape[1:] == (image_tokens, width) and attn[1].shape[1:] == (text_tokens, width)
    for out, attn in zip(singles, single_attns):
        assert out[0].shape[1:] == (text_tokens, width) and out[1].shape[1:] == (image_tokens, width)
        assert isinstance(attn, torch.Tensor) and attn.shape[1:] == (text_tokens + image_tokens, width)
    assert len(singles) == (2 if family == "flux" else 0)


def test_pixart_blocks_and_cross_attention_return_image_tokens_only():
    pipe = tiny_pipeline("pixart_sigma")
    outs = []
    for block in pipe.transformer.transformer_blocks:
        record(block, outs)
        record(block.attn2, outs)
    run(pipe, "pixart_sigma", prompt=PROMPTS[:1], num_inference_steps=1)
    grid = token_grid(pipe, "pixart_sigma")
    assert grid == 4 and len(outs) == 4
    assert all(isinstance(o, torch.Tensor) and o.shape == (2, grid * grid, pipe.transformer.inner_dim) for o in outs)


@pytest.mark.parametrize("family, encoder, length, masked", [
    ("pixart_sigma", "text_encoder", 300, True),
    ("stable_diffusion_3", "text_encoder_3", 256, False),
    ("flux", "text_encoder_2", 512, False),
])
def test_t5_length_and_mask_per_family(family, encoder, length, masked):
    """Where no mask is passed, steering must read padding from the token ids."""
    pipe = tiny_pipeline(family)
    calls = []
    record(getattr(pipe, encoder), calls, pre=True)
    run(pipe, family, prompt=PROMPTS[:1], num_inference_steps=1)
    args, kwargs = calls[0]
    ids = args[0] if args else kwargs["input_ids"]
    assert ids.shape == (1, length)
    assert (kwargs.get("attention_mask") is not None) == masked


@pytest.mark.parametrize("family", ["stable_diffusion_xl", "stable_diffusion_3"])
def test_clip_embeddings_are_the_penultimate_hidden_state(family):
    pipe = tiny_pipeline(family)
    more = {"prompt_2": None, "prompt_3": None} if family == "stable_diffusion_3" else {}
    embeds = pipe.encode_prompt(PROMPTS, **more, do_classifier_free_guidance=False)[0]
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    width = pipe.text_encoder.config.hidden_size
    with torch.no_grad():
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states
    assert torch.equal(embeds[:, :77, :width], hidden[-2])
    assert not torch.equal(hidden[-2], hidden[-1])


def test_sdxl_negative_of_an_empty_prompt_is_zeros():
    pipe = tiny_pipeline("stable_diffusion_xl")
    assert pipe.config.force_zeros_for_empty_prompt
    _, negative, _, negative_pooled = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True)
    assert not negative.any() and not negative_pooled.any()


@pytest.mark.parametrize("family, call, calls_per_step, batch", [
    ("stable_diffusion", {}, 1, 4),  # [negative; positive] halves of 2 prompts
    ("stable_diffusion_xl", {}, 1, 4),
    ("pixart_sigma", {}, 1, 4),
    ("stable_diffusion_3", {}, 1, 4),
    ("flux", {}, 1, 2),  # guidance-distilled: no negative branch
    ("flux", dict(negative_prompt=["blurry"] * 2, true_cfg_scale=2.0), 2, 2),  # true CFG: a second call
])
def test_classifier_free_guidance_layout(family, call, calls_per_step, batch):
    pipe = tiny_pipeline(family)
    denoiser = pipe.unet if family in ("stable_diffusion", "stable_diffusion_xl") else pipe.transformer
    calls = []
    record(denoiser, calls, pre=True)
    run(pipe, family, num_inference_steps=1, **call)
    assert len(calls) == calls_per_step
    for args, kwargs in calls:
        assert (args[0] if args else kwargs["hidden_states"]).shape[0] == batch
