"""Stable Diffusion XL with Dynamically Scaled Activation Steering.

A subclass of diffusers' `StableDiffusionXLPipeline`: loading, schedulers, dtypes, LoRA, callbacks and the denoising
loop are the stock ones; `DSASPipelineMixin` adds `fit_steering`, `set_steering` and the per-call
steering arguments. Steered by default: the layers of both CLIP text encoders (per prompt token) and the UNet's
cross-attention (per spatial position).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

from .dsas_mixin import DSASPipelineMixin


@dataclass
class DSASStableDiffusionXLPipelineOutput(StableDiffusionXLPipelineOutput):
    """`steering_scales`: the lambdas that were applied, per layer name: text encoder layers
    (prompts, tokens); UNet layers (steps, prompts x images, H', W') over the conditional branch.
    None when no steering ran."""

    steering_scales: dict[str, torch.Tensor] | None = None


class DSASStableDiffusionXLPipeline(DSASPipelineMixin, StableDiffusionXLPipeline):
    r"""Stable Diffusion XL with a DSAS `Steering`: fit with `fit_steering`, set with `set_steering`, and
    choose the global strength (alpha) per call with `steering_strength`."""

    _output_class = DSASStableDiffusionXLPipelineOutput
