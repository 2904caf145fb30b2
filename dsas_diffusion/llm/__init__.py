"""What is specific to transformers language models: layer names, KV caches, padding, token heatmaps."""

from .attach import attach
from .fitting import fit_steering
from .plots import token_heatmap_html, token_heatmap_png
from .sequence import causal_lm_pre_forward
from .targets import DEFAULT_PRESETS, layer_presets, resolve_layers

__all__ = ["attach", "fit_steering", "token_heatmap_html", "token_heatmap_png", "causal_lm_pre_forward",
           "DEFAULT_PRESETS", "layer_presets", "resolve_layers"]
