"""What is specific to diffusers pipelines: target modules, CLIP token masks, stage-wise fitting."""

from .fitting import fit_pipeline_steering
from .targets import TEXT_ENCODER_LAYERS, UNET_LAYERS

__all__ = ["fit_pipeline_steering", "TEXT_ENCODER_LAYERS", "UNET_LAYERS"]
