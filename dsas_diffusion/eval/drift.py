"""Drift: how far a steered image moved from its unsteered twin (same prompt, seed and settings).

Measured on control prompts it is the collateral damage of steering, which DSAS aims to keep
at zero. Two measures: `pixel_drift`, the mean absolute pixel difference in [0, 1] (model-free,
0 exactly when the images are identical), and `embedding_drift`, 1 - cosine similarity of the
CLIP image embeddings (semantic: ignores changes CLIP does not see).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def pixel_drift(image: Image.Image, twin: Image.Image) -> float:
    """Mean absolute difference of the RGB pixels, in [0, 1]."""
    if image.size != twin.size:
        raise ValueError(f"an image of size {image.size} cannot be compared with its twin of size {twin.size}; "
                         "generate both at the same height and width")
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    b = np.asarray(twin.convert("RGB"), dtype=np.float32)
    return float(np.abs(a - b).mean() / 255.0)


def embedding_drift(embeddings: torch.Tensor, twin_embeddings: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity, row by row, of unit-norm embeddings (N, D) -> (N,)."""
    return (1 - (embeddings * twin_embeddings).sum(-1)).clamp_min(0)
