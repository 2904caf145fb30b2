"""Evaluation of steered images: pluggable scorers (CLIP score and zero-shot concept rate, NudeNet
nudity rate, the toy world's pixel rules), drift of control images from their unsteered twins,
Pareto fronts over the strength alpha, and lambda-map overlays.

Heavy and optional dependencies load lazily: transformers' CLIP when a scorer is built,
open_clip only for its backend, nudenet only for its scorer, matplotlib only for plots.
"""

from .clip_score import BACKENDS, DEFAULT_CLIP_MODEL, ClipEmbedder, ClipScorer, clip_scores, load_clip, preprocess_image
from .concept import check_concept_texts, concept_probabilities, concept_rate
from .drift import embedding_drift, pixel_drift
from .nudity import NUDITY_CLASSES, NudeNetScorer
from .overlays import compare_strip, lambda_map, lambda_overlay, token_lambdas
from .pareto import pareto_mask, pareto_table, plot_pareto
from .scorers import SCORERS, Scorer, ScorerOptions, concept_judge, load_scorers, register_scorer
from .toy_rules import ToyScorer

__all__ = [
    "BACKENDS", "DEFAULT_CLIP_MODEL", "ClipEmbedder", "ClipScorer", "clip_scores", "load_clip", "preprocess_image",
    "check_concept_texts", "concept_probabilities", "concept_rate", "embedding_drift", "pixel_drift",
    "NUDITY_CLASSES", "NudeNetScorer", "compare_strip", "lambda_map", "lambda_overlay", "token_lambdas",
    "pareto_mask", "pareto_table", "plot_pareto", "SCORERS", "Scorer", "ScorerOptions", "concept_judge",
    "load_scorers", "register_scorer", "ToyScorer",
]
