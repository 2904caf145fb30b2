"""PixArt-Σ with Dynamically Scaled Activation Steering.

A subclass of diffusers' `PixArtSigmaPipeline`: loading, schedulers, dtypes, LoRA, callbacks and the denoising
loop are the stock ones; `DSASPipelineMixin` adds `fit_steering`, `set_steering` and the per-call
steering arguments. Steered by default: the T5 text encoder's layers (per prompt token, padding read from the
attention mask the pipeline passes) and the transformer's cross-attention (per image token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import PixArtSigmaPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from .dsas_mixin import DSASPipelineMixin


@dataclass
class DSASPixArtSigmaPipelineOutput(ImagePipelineOutput):
    """`steering_scales`: the lambdas that were applied, per layer name: text encoder layers
    (prompts, tokens); transformer layers (steps, prompts x images, H', W') over the conditional branch.
    None when no steering ran."""

    steering_scales: dict[str, torch.Tensor] | None = None


class DSASPixArtSigmaPipeline(DSASPipelineMixin, PixArtSigmaPipeline):
    r"""PixArt-Σ with a DSAS `Steering`: fit with `fit_steering`, set with `set_steering`, and
    choose the global strength (alpha) per call with `steering_strength`."""

    _output_class = DSASPixArtSigmaPipelineOutput
