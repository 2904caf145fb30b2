"""Custom diffusers pipelines with DSAS steering (installed as `dsas_diffusion.pipelines`)."""

from .pipeline_dsas_flux import DSASFluxPipeline, DSASFluxPipelineOutput
from .pipeline_dsas_pixart_sigma import DSASPixArtSigmaPipeline, DSASPixArtSigmaPipelineOutput
from .pipeline_dsas_stable_diffusion import DSASStableDiffusionPipeline, DSASStableDiffusionPipelineOutput
from .pipeline_dsas_stable_diffusion_3 import DSASStableDiffusion3Pipeline, DSASStableDiffusion3PipelineOutput
from .pipeline_dsas_stable_diffusion_xl import DSASStableDiffusionXLPipeline, DSASStableDiffusionXLPipelineOutput

NAMED_PIPELINES = {
    "stable_diffusion": DSASStableDiffusionPipeline,
    "stable_diffusion_xl": DSASStableDiffusionXLPipeline,
    "stable_diffusion_3": DSASStableDiffusion3Pipeline,
    "flux": DSASFluxPipeline,
    "pixart_sigma": DSASPixArtSigmaPipeline,
}  # family name (dsas_diffusion.diffusion.FAMILIES) -> its named pipeline

__all__ = ["NAMED_PIPELINES", "DSASStableDiffusionPipeline", "DSASStableDiffusionPipelineOutput",
           "DSASStableDiffusionXLPipeline",
           "DSASStableDiffusionXLPipelineOutput", "DSASStableDiffusion3Pipeline", "DSASStableDiffusion3PipelineOutput",
           "DSASFluxPipeline", "DSASFluxPipelineOutput", "DSASPixArtSigmaPipeline", "DSASPixArtSigmaPipelineOutput"]
