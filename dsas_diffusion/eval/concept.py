"""Concept rate by CLIP zero-shot classification: is the concept in the image?

Each image is compared with the concept texts ("a photo of a banana") and the anti-concept texts
("a photo of an apple", "a photo of a table"); the probability of the concept is the softmax mass
on the concept texts, at the model's own logit scale. An image shows the concept when that
probability exceeds `threshold` (0.5); the concept rate of a set of images is the fraction that do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_concept_texts(concept: Sequence[str], anti_concept: Sequence[str]) -> None:
    if not concept or not anti_concept:
        missing = "concept" if not concept else "anti-concept"
        raise ValueError(f"the {missing} texts are empty; zero-shot classification needs both, e.g. "
                         '--concept "a photo of a banana" --anti-concept "a photo of an apple"')
    overlap = sorted(set(concept) & set(anti_concept))
    if overlap:
        raise ValueError(f"{overlap[0]!r} is both a concept and an anti-concept text; each text must be on one side")


def concept_probabilities(image_embeddings: torch.Tensor, concept_embeddings: torch.Tensor,
                          anti_embeddings: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """P(concept) per image (N,) from unit-norm embeddings: softmax over all texts, mass on the concept ones."""
    texts = torch.cat([concept_embeddings, anti_embeddings])
    probs = (logit_scale * image_embeddings @ texts.T).softmax(dim=-1)
    return probs[:, : concept_embeddings.shape[0]].sum(-1)


def concept_rate(probabilities: torch.Tensor | Sequence[float] | Sequence[bool], threshold: float = 0.5) -> float:
    """Fraction of images whose concept probability exceeds `threshold`; booleans are decisions already
    taken (the `is_concept` of scores.jsonl) and are counted as they are. NaN for no images."""
    p = torch.as_tensor(probabilities)
    if p.numel() == 0:
        return float("nan")
    shows = p if p.dtype == torch.bool else p > threshold
    return float(shows.double().mean())
