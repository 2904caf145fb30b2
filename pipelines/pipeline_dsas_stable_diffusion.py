"""Stable Diffusion 1.x / 2.x with Dynamically Scaled Activation Steering.

A subclass of diffusers' `StableDiffusionPipeline`: loading, schedulers, dtypes, LoRA, callbacks
and the denoising loop are the stock ones; `DSASPipelineMixin` adds `fit_steering`,
`set_steering` and the per-call steering arguments. Steered by default: the CLIP text encoder's
layers (per prompt token) and the UNet's cross-attention (per spatial position).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

from .dsas_mixin import DSASPipelineMixin


@dataclass
class DSASStableDiffusionPipelineOutput(StableDiffusionPipelineOutput):
    """`steering_scales`: the lambdas that were applied, per layer name: text encoder layers
    (prompts, tokens); UNet layers (steps, prompts x images, height, width) over the conditional
    branch. None when no steering ran."""

    steering_scales: dict[str, torch.Tensor] | None = None


class DSASStableDiffusionPipeline(DSASPipelineMixin, StableDiffusionPipeline):
    r"""Stable Diffusion with a DSAS `Steering`: fit with `fit_steering`, set with `set_steering`,
    and choose the global strength (alpha) per call with `steering_strength`."""

    _output_class = DSASStableDiffusionPipelineOutput
