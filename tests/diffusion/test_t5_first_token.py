"""`skip_first_token` skips a BOS, where there is one: a T5 prompt starts with a word (PixArt, and T5 in SD3 and
FLUX) and a denoiser's first position is an image patch, so both are steered, and the overlay shows the word."""

import pytest
import torch

from dsas_diffusion import Steering, SteeringConfig, apply_dsas
from dsas_diffusion.core import Gate, MeanShift
from dsas_diffusion.diffusion.families import FAMILIES as TABLE
from dsas_diffusion.eval import token_lambdas

from tests.diffusion.tiny_pipelines import CALL_KWARGS, FAMILIES, tiny_components, tiny_pipeline

PROMPT = "a banana on the road"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_family_table_says_which_tokenizers_start_with_a_bos(family):
    components, entry = tiny_components(family), TABLE[family]
    for text_encoder, tokenizer in entry.text_encoders:
        tok = components[tokenizer]
        starts_with_bos = tok.bos_token_id is not None and tok(PROMPT).input_ids[0] == tok.bos_token_id
        assert entry.has_bos(text_encoder) == starts_with_bos, (text_encoder, type(tok).__name__)
        assert entry.skip_first_token(text_encoder, True) == starts_with_bos
        assert not entry.skip_first_token(text_encoder, False)
    assert not entry.has_bos(entry.denoiser)


def _always_on(layers: dict[str, tuple[int, str]]) -> Steering:
    """A mean shift of 1 on each layer, its gate always on, skip_first_token as by default."""
    config = SteeringConfig(method="mean_shift", layers={
        name: {"width": width, "kind": kind, "gate_accuracy": 1.0} for name, (width, kind) in layers.items()})
    assert config.skip_first_token
    return Steering(config, {name: MeanShift(shift=torch.ones(width)) for name, (width, _) in layers.items()},
                    {name: Gate(weight=torch.zeros(width), bias=torch.full((), 10.0), accuracy=1.0)
                     for name, (width, _) in layers.items()})


def test_pixart_steers_and_shows_the_first_word_and_the_first_patch():
    pipe = tiny_pipeline("pixart_sigma")
    encoder, denoiser = "text_encoder.encoder.block.0", "transformer.transformer_blocks.0.attn2"
    steering = _always_on({encoder: (pipe.text_encoder.config.d_model, "tokens"),
                           denoiser: (pipe.transformer.inner_dim, "spatial")})

    def embeds():
        return pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, device="cpu", clean_caption=False)[0]

    stock = embeds()
    applied = apply_dsas(pipe, steering, check_model=False)
    steered = embeds()
    assert not torch.equal(steered[0, 0], stock[0, 0])  # "a", the first word, is steered
    pipe(PROMPT, generator=torch.Generator().manual_seed(0), **CALL_KWARGS["pixart_sigma"])
    lam = applied.scales[encoder]
    assert lam[0, 0] > 0.99 and torch.equal(lam[0, 0], lam[0, 1])
    tokens, sequence = token_lambdas(applied.scales, pipe.tokenizer, PROMPT)
    assert [t for t, _ in tokens] == PROMPT.split() and all(v > 0.99 for _, v in tokens) and sequence > 0.99
    grid = applied.scales[denoiser]  # (steps, images, H', W'): the top-left patch too
    assert grid.shape[-2:] == (4, 4) and (grid > 0.99).all()


def test_a_clip_bos_is_still_skipped_and_left_out_of_the_overlay_and_the_unet_steers_every_position():
    pipe = tiny_pipeline("stable_diffusion")
    layer, unet = "text_encoder.encoder.layers.0", "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    width = pipe.unet.get_submodule(unet.split(".", 1)[1]).to_out[0].out_features
    applied = apply_dsas(pipe, _always_on({layer: (pipe.text_encoder.config.hidden_size, "tokens"),
                                           unet: (width, "spatial")}), check_model=False)
    pipe(PROMPT, generator=torch.Generator().manual_seed(0), **CALL_KWARGS["stable_diffusion"])
    lam = applied.scales[layer]
    assert lam[0, 0] == 0 and lam[0, 1] > 0.99
    tokens, _ = token_lambdas(applied.scales, pipe.tokenizer, PROMPT)
    assert [t for t, _ in tokens] == PROMPT.split()
    assert (applied.scales[unet] > 0.99).all()  # the top-left latent position too
