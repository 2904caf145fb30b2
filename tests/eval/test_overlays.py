"""Lambda overlays: the map is the mean over layers and steps at image size; token lambdas line up
with the prompt's tokens."""

import numpy as np
import torch
from PIL import Image

from dsas_diffusion.eval import compare_strip, lambda_map, lambda_overlay, token_lambdas
from dsas_diffusion.eval.overlays import GAP, averaged_over, colormap

from tests.conftest import TOKENIZER_DIR


def test_lambda_map_averages_layers_and_steps_at_image_size():
    scales = {
        "unet.a": torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)]),  # (steps, images, h, w): mean 0.5
        "unet.b": torch.ones(2, 1, 2, 2),                                     # another resolution: 1
        "text_encoder.encoder.layers.0": torch.zeros(1, 77),                  # not a map
    }
    lam = lambda_map(scales, (8, 6))
    assert lam.shape == (6, 8) and torch.allclose(lam, torch.full((6, 8), 0.75))
    assert lambda_map({"text_encoder.x": torch.zeros(1, 77)}, (8, 8)) is None


def test_token_lambdas_line_up_with_the_prompt():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    lam = torch.zeros(1, 77)
    lam[0, 1:4] = torch.tensor([0.1, 0.9, 0.2])  # a / banana / bowl
    lam[0, 5:] = 0.7  # padding: the sequence decision
    tokens, sequence = token_lambdas({"text_encoder.encoder.layers.0": lam}, tok, "a banana bowl")
    assert tokens == [("a", 0.1), ("banana", 0.9), ("bowl", 0.2)] and sequence == 0.7
    assert token_lambdas({"unet.x": torch.zeros(1, 1, 2, 2)}, tok, "a banana") == ([], None)


def test_overlay_and_comparison_images():
    image = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
    out = lambda_overlay(image, torch.ones(32, 32), [("banana", 0.9), ("bowl", 0.1)])
    assert out.width == 2 * 256 + GAP and out.height > 256
    assert tuple(np.asarray(out)[10, 300]) == tuple((0.55 * colormap(1.0)).round().astype(np.uint8))
    assert lambda_overlay(image, None).width == 256  # no denoiser map: the image and the scale only
    assert tuple(colormap(0.0)) == (68, 1, 84) and tuple(colormap(1.0)) == (253, 231, 37)


def _text_rows(picture: Image.Image, top: int) -> int:
    """How many pixel rows below `top` hold something other than white (drawn text)."""
    return int((np.asarray(picture)[top:] < 200).any(axis=(1, 2)).sum())


def test_a_comparison_strip_states_prompt_seed_and_alpha_under_enlarged_tiles():
    from dsas_diffusion.cli.generation import comparison_caption

    image = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
    caption = comparison_caption("a red circle on a grey background", 7, 1.5)
    assert caption == 'prompt: "a red circle on a grey background"   seed: 7   alpha: 1.5'
    bare = compare_strip([image] * 3, ["unsteered", "plain a=1.5", "DSAS a=1.5"])
    strip = compare_strip([image] * 3, ["unsteered", "plain a=1.5", "DSAS a=1.5"], caption=caption)
    assert strip.width == bare.width == 3 * 256 + 2 * GAP  # 32 px tiles drawn 8x: the text is legible beside them
    assert strip.height > bare.height and _text_rows(strip, bare.height) >= 9  # one line of 13 px text
    long = compare_strip([image] * 3, ["a", "b", "c"], caption=caption * 4)
    assert long.width == strip.width and long.height > strip.height  # wrapped, not cut


def test_an_overlay_says_which_layers_and_steps_it_averages():
    scales = {
        "transformer.transformer_blocks.0.attn": torch.zeros(3, 1, 4, 4),  # (steps, images, h, w)
        "transformer.transformer_blocks.1.attn": torch.zeros(3, 1, 4, 4),
        "text_encoder.encoder.layers.0": torch.zeros(1, 77),
        "text_encoder_2.encoder.block.0": torch.zeros(1, 256),  # another tokenizer's tokens: not shown
    }
    assert averaged_over(scales).splitlines() == [
        "lambda map: mean over 3 denoising steps and 2 layers of transformer: transformer_blocks.0.attn, "
        "transformer_blocks.1.attn",
        "token lambdas: mean over 1 layer of text_encoder: encoder.layers.0"]
    many = {f"unet.up_blocks.{i}.attn2": torch.zeros(1, 1, 2, 2) for i in range(5)}
    assert averaged_over(many) == ("lambda map: mean over 1 denoising step and 5 layers of unet: up_blocks.0.attn2, "
                                   "..., up_blocks.4.attn2")
    assert averaged_over(None) == ""
    image = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
    plain = lambda_overlay(image, torch.ones(32, 32))
    captioned = lambda_overlay(image, torch.ones(32, 32), caption=averaged_over(scales))
    assert captioned.height > plain.height and _text_rows(captioned, plain.height) >= 2 * 9
