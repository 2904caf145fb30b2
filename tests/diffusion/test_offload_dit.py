"""Sequential offload on the DiT families (PixArt-Σ, SD3, FLUX): with the weights kept off the execution device
between forwards and brought in per module, steered images and lambdas equal those of the steered pipeline
without offload, bit for bit, whether the steering is applied before or after offload is enabled."""

import accelerate
import numpy as np
import pytest
import torch

from dsas_diffusion import apply_dsas

from tests.diffusion.test_half_precision_dit import LAYERS, random_steering, run
from tests.diffusion.tiny_pipelines import tiny_pipeline

CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=tuple(LAYERS))
def steered(request):
    """(family, steering, images, lambdas) of the steered pipeline without offload."""
    family = request.param
    pipe = tiny_pipeline(family)
    steering = random_steering(pipe, LAYERS[family])
    applied = apply_dsas(pipe, steering, check_model=False)
    return family, steering, run(pipe, family), applied.scales


def _same(pipe, family, applied, images, scales):
    assert np.array_equal(run(pipe, family), images)
    assert applied.scales.keys() == scales.keys()
    assert all(torch.equal(applied.scales[k], v) for k, v in scales.items())


@pytest.mark.parametrize("apply_first", [False, True], ids=["offload-then-apply", "apply-then-offload"])
def test_leaf_level_offload_gives_the_steered_images(steered, apply_first):
    """diffusers' leaf-level group offload: every leaf module onloaded for its own forward, like accelerate's
    sequential offload, on every component."""
    family, steering, images, scales = steered
    pipe = tiny_pipeline(family)
    applied = apply_dsas(pipe, steering, check_model=False) if apply_first else None
    pipe.enable_group_offload(onload_device=CPU, offload_type="leaf_level")
    applied = applied or apply_dsas(pipe, steering, check_model=False)
    _same(pipe, family, applied, images, scales)


def test_accelerate_sequential_offload_gives_the_steered_images(steered):
    """`enable_sequential_cpu_offload`: accelerate's hooks put every weight on the meta device between forwards."""
    family, steering, images, scales = steered
    stock = tiny_pipeline(family)
    stock.enable_sequential_cpu_offload(device=CPU)
    try:
        run(stock, family)
    except TypeError as e:  # accelerate 1.15 under torch 2.13: an embedding's weight fails to go back to meta
        pytest.skip(f"sequential offload fails on the stock pipeline with accelerate {accelerate.__version__} and "
                    f"torch {torch.__version__} ({str(e).splitlines()[0]})")
    pipe = tiny_pipeline(family)
    pipe.enable_sequential_cpu_offload(device=CPU)
    assert next(pipe.transformer.parameters()).device.type == "meta"
    _same(pipe, family, apply_dsas(pipe, steering, check_model=False), images, scales)


def test_accelerate_offload_of_the_denoiser_alone_gives_the_steered_images(steered):
    """The part of sequential offload that runs here: accelerate's cpu_offload on the denoiser (its weights on
    the meta device between forwards), steered in its image stream."""
    family, steering, images, scales = steered
    pipe = tiny_pipeline(family)
    accelerate.cpu_offload(pipe.transformer, execution_device=CPU)
    assert next(pipe.transformer.parameters()).device.type == "meta"
    _same(pipe, family, apply_dsas(pipe, steering, check_model=False), images, scales)
