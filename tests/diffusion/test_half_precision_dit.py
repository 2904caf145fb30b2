"""The DiT families (PixArt-Σ, SD3, FLUX) in bfloat16 and float16: at strength 0 the steered pipeline is the
stock one in that dtype bit for bit, and steered it is finite and as close to the float32 steered images as the
stock half-precision images are to the float32 stock ones (steering adds no error of its own), with the gates'
lambdas close to float32's (the gate runs in float32 whatever the model's dtype)."""

import numpy as np
import pytest
import torch

from dsas_diffusion import Steering, SteeringConfig, apply_dsas
from dsas_diffusion.core import Gate, MeanShift

from tests.diffusion.tiny_pipelines import CALL_KWARGS, tiny_pipeline

PROMPT = "a banana on the road"
# a T5 layer and a CLIP one where the family has them, and the denoiser's image stream
LAYERS = {
    "pixart_sigma": ("text_encoder.encoder.block.0", "transformer.transformer_blocks.0.attn2"),
    "stable_diffusion_3": ("text_encoder_3.encoder.block.0", "text_encoder.text_model.encoder.layers.1",
                           "transformer.transformer_blocks.0.attn"),
    "flux": ("text_encoder_2.encoder.block.0", "transformer.transformer_blocks.1.attn"),
}
# Measured with this file's steering: |half steered - float32 steered| / |half stock - float32 stock| was 0.67-1.07
# over the three families and both dtypes; the steering moved the images 4-236x that rounding; the lambdas
# (0.00-0.93) moved by at most 0.0022 (bf16) and 0.0003 (fp16)
ROUNDING_RATIO = 1.5
LAMBDA_TOLERANCE = {torch.bfloat16: 0.01, torch.float16: 0.002}


def random_steering(pipe, layers) -> Steering:
    """A random mean shift on each layer with a random gate that reads the activations (lambdas in (0, 1))."""
    g = torch.Generator().manual_seed(0)
    entries, maps, gates = {}, {}, {}
    for name in layers:
        component = getattr(pipe, name.split(".", 1)[0])
        config = component.config
        width = getattr(config, "d_model", None) or getattr(config, "hidden_size", None) or component.inner_dim
        entries[name] = {"width": width, "kind": "spatial" if name.startswith("transformer.") else "tokens",
                         "gate_accuracy": 1.0}
        maps[name] = MeanShift(shift=torch.randn(width, generator=g))
        gates[name] = Gate(weight=torch.randn(width, generator=g) / width ** 0.5, bias=torch.zeros(()), accuracy=1.0)
    return Steering(SteeringConfig(method="mean_shift", layers=entries), maps, gates)


def run(pipe, family):
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **CALL_KWARGS[family]).images


@pytest.fixture(scope="module", params=tuple(LAYERS))
def float32(request):
    """(family, steering, stock images, steered images, lambdas) in float32."""
    family = request.param
    pipe = tiny_pipeline(family)
    steering = random_steering(pipe, LAYERS[family])
    stock = run(pipe, family)
    applied = apply_dsas(pipe, steering, check_model=False)
    return family, steering, stock, run(pipe, family), applied.scales


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_dit_is_stock_at_zero_and_close_to_float32_steered(float32, dtype):
    family, steering, stock32, steered32, scales32 = float32
    pipe = tiny_pipeline(family).to(dtype)
    stock = run(pipe, family)
    applied = apply_dsas(pipe, steering, strength=0.0, check_model=False)
    assert np.array_equal(run(pipe, family), stock)
    applied.strength = 1.0
    steered = run(pipe, family)
    rounding = np.abs(stock - stock32).max()  # the half-precision model's own error
    assert np.isfinite(steered).all()
    assert np.abs(steered - steered32).max() <= ROUNDING_RATIO * rounding
    assert np.abs(steered - stock).max() > 2 * rounding  # and the steering acts, beyond the rounding
    for name, lam in applied.scales.items():
        assert lam.dtype == torch.float32
        assert (lam - scales32[name]).abs().max() <= LAMBDA_TOLERANCE[dtype], name
