"""dsas-diffusion: Dynamically Scaled Activation Steering for diffusers pipelines and transformers LMs.

`Steering` comes from the torch-only core; the pipelines and the diffusers integration are
imported on first use, so `import dsas_diffusion` stays light.
"""

from .core import Steering, SteeringConfig
from .llm import sequence as _llm_sequence  # noqa: F401  registers how `Steering.attach` reads a causal LM

__version__ = "0.1.0"

_PIPELINES = "dsas_diffusion.pipelines"
_LAZY = {
    "apply_dsas": "dsas_diffusion.diffusion.integration",
    "remove_dsas": "dsas_diffusion.diffusion.integration",
    "PipelineSteering": "dsas_diffusion.diffusion.integration",
    "fit_pipeline_steering": "dsas_diffusion.diffusion.fitting",
    **{name: _PIPELINES for name in (
        "DSASStableDiffusionPipeline", "DSASStableDiffusionPipelineOutput",
        "DSASStableDiffusionXLPipeline", "DSASStableDiffusionXLPipelineOutput",
        "DSASStableDiffusion3Pipeline", "DSASStableDiffusion3PipelineOutput",
        "DSASFluxPipeline", "DSASFluxPipelineOutput",
        "DSASPixArtSigmaPipeline", "DSASPixArtSigmaPipelineOutput",
    )},
}

__all__ = ["Steering", "SteeringConfig", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dsas_diffusion' has no attribute {name!r}")
