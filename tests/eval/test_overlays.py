"""Lambda overlays: the map is the mean over layers and steps at image size; token lambdas line up
with the prompt's tokens."""

import numpy as np
import torch
from PIL import Image

from dsas_diffusion.eval import compare_strip, lambda_map, lambda_overlay, token_lambdas
from dsas_diffusion.eval.overlays import colormap

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
    assert out.width == 2 * 256 and out.height > 256
    assert tuple(np.asarray(out)[10, 300]) == tuple((0.55 * colormap(1.0)).round().astype(np.uint8))
    assert lambda_overlay(image, None).width == 256  # no UNet map: the image and the scale only
    strip = compare_strip([image] * 3, ["unsteered", "plain a=1", "DSAS a=1"])
    assert strip.width == 3 * 128
    assert tuple(colormap(0.0)) == (68, 1, 84) and tuple(colormap(1.0)) == (253, 231, 37)
