"""FLUX.1 with Dynamically Scaled Activation Steering.

A subclass of diffusers' `FluxPipeline`: loading, schedulers, dtypes, LoRA, callbacks and the denoising
loop are the stock ones; `DSASPipelineMixin` adds `fit_steering`, `set_steering` and the per-call
steering arguments. Steered by default: the layers of the CLIP and T5 text encoders (per prompt token) and the
image stream of every dual-stream attention of the transformer (per packed 2x2 latent token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux import FluxPipelineOutput

from .dsas_mixin import DSASPipelineMixin


@dataclass
class DSASFluxPipelineOutput(FluxPipelineOutput):
    """`steering_scales`: the lambdas that were applied, per layer name: text encoder layers
    (prompts, tokens); transformer layers (steps, prompts x images, H', W') over the conditional branch.
    None when no steering ran."""

    steering_scales: dict[str, torch.Tensor] | None = None


class DSASFluxPipeline(DSASPipelineMixin, FluxPipeline):
    r"""FLUX.1 with a DSAS `Steering`: fit with `fit_steering`, set with `set_steering`, and
    choose the global strength (alpha) per call with `steering_strength`."""

    _output_class = DSASFluxPipelineOutput
