"""What is specific to diffusers pipelines: the per-family adapter table, apply / remove, fitting."""

from .families import FAMILIES, Family, family_of
from .fitting import fit_pipeline_steering
from .integration import PipelineSteering, apply_dsas, remove_dsas

__all__ = ["FAMILIES", "Family", "family_of", "fit_pipeline_steering", "PipelineSteering", "apply_dsas",
           "remove_dsas"]
