"""Evaluation of steered images: CLIP score, concept rate (CLIP zero-shot), drift of control images
from their unsteered twins, Pareto fronts over the strength alpha, and lambda-map overlays.

Heavy and optional dependencies load lazily: transformers' CLIP when a scorer is built,
open_clip only for its backend, matplotlib only for plots.
"""

from .clip_score import BACKENDS, DEFAULT_CLIP_MODEL, ClipEmbedder, clip_scores, load_clip, preprocess_image
from .concept import check_concept_texts, concept_probabilities, concept_rate
from .drift import embedding_drift, pixel_drift
from .overlays import compare_strip, lambda_map, lambda_overlay, token_lambdas
from .pareto import pareto_mask, pareto_table, plot_pareto

__all__ = [
    "BACKENDS", "DEFAULT_CLIP_MODEL", "ClipEmbedder", "clip_scores", "load_clip", "preprocess_image",
    "check_concept_texts", "concept_probabilities", "concept_rate", "embedding_drift", "pixel_drift",
    "compare_strip", "lambda_map", "lambda_overlay", "token_lambdas", "pareto_mask", "pareto_table", "plot_pareto",
]
