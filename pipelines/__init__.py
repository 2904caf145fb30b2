"""Custom diffusers pipelines with DSAS steering (installed as `dsas_diffusion.pipelines`)."""

from .pipeline_dsas_stable_diffusion import DSASStableDiffusionPipeline, DSASStableDiffusionPipelineOutput

__all__ = ["DSASStableDiffusionPipeline", "DSASStableDiffusionPipelineOutput"]
