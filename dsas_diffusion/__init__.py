"""dsas-diffusion: Dynamically Scaled Activation Steering for diffusers pipelines and transformers LMs.

`Steering` comes from the torch-only core; the pipelines are imported on first use, so
`import dsas_diffusion` stays light.
"""

from .core import Steering, SteeringConfig

__version__ = "0.1.0"

_LAZY = {
    "DSASStableDiffusionPipeline": "dsas_diffusion.pipelines.pipeline_dsas_stable_diffusion",
    "DSASStableDiffusionPipelineOutput": "dsas_diffusion.pipelines.pipeline_dsas_stable_diffusion",
}

__all__ = ["Steering", "SteeringConfig", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dsas_diffusion' has no attribute {name!r}")
