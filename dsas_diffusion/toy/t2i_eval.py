"""Measuring steering in the toy text-to-image world: concept rate on source prompts, and damage
on control prompts (pixel drift from their unsteered twins, and whether they still show what
their caption asked for). Everything is read off the pixels by the world's exact rules."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..eval.drift import pixel_drift

from .t2i_world import COLOURS, SHAPES, Scene, all_scenes, colour_of, faithful, parse, shape_of


@dataclass
class ConceptSplit:
    """Prompts to fit a steering on, and held-out prompts to measure it on."""

    concept: str
    source: list[str]
    target: list[str]
    control: list[str]
    held_out_source: list[str]
    held_out_control: list[str]


def _has(scene: Scene, concept: str) -> bool:
    return concept in (scene.colour, scene.shape)


def concept_split(concept: str, replacement: str, held_out: float = 0.34, seed: int = 0) -> ConceptSplit:
    """Source: captions with the concept (a colour or a shape); target: the same captions with
    `replacement`; control: captions without it. A third of each is held out for measuring."""
    if concept not in COLOURS and concept not in SHAPES:
        raise ValueError(f"concept {concept!r} is neither a colour {list(COLOURS)} nor a shape {list(SHAPES)}")
    rng = random.Random(seed)
    with_c = [s for s in all_scenes() if _has(s, concept)]
    without = [s for s in all_scenes() if not _has(s, concept)]
    rng.shuffle(with_c)
    rng.shuffle(without)
    n_s, n_c = round(len(with_c) * held_out), round(len(without) * held_out)
    fit_s, fit_c = with_c[n_s:], without[n_c:]
    return ConceptSplit(
        concept=concept,
        source=[s.caption for s in fit_s],
        target=[s.caption.replace(f" {concept} ", f" {replacement} ") for s in fit_s],
        control=[s.caption for s in fit_c],
        held_out_source=[s.caption for s in with_c[:n_s]],
        held_out_control=[s.caption for s in without[:n_c]],
    )


def shows_concept(image: np.ndarray, caption: str, concept: str) -> bool:
    scene = parse(caption)
    read = colour_of(image, scene.background) if concept in COLOURS else shape_of(image, scene.background)
    return read == concept


def generate(pipe, prompts: list[str], seeds: list[int], steps: int = 20, guidance: float = 4.0,
             **call) -> np.ndarray:
    """Images (prompts * seeds, 32, 32, 3) uint8; prompt-major order, one generator per image."""
    batch = [p for p in prompts for _ in seeds]
    gens = [torch.Generator().manual_seed(s) for _ in prompts for s in seeds]
    out = pipe(batch, generator=gens, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
               return_steering_scales=False, **call)
    return (out.images * 255).round().astype(np.uint8)


def measure(pipe, split: ConceptSplit, seeds: list[int], *, baseline: dict | None = None, steps: int = 20,
            guidance: float = 4.0, **call) -> dict:
    """Concept rate on held-out source images, drift and faithfulness of held-out control images.

    `baseline` (the result of an unsteered `measure`) supplies the unsteered control images the
    drift is taken against; call keyword arguments go to the pipeline (steering_strength, gated, ...)."""
    src = generate(pipe, split.held_out_source, seeds, steps, guidance, **call)
    ctl = generate(pipe, split.held_out_control, seeds, steps, guidance, **call)
    src_caps = [p for p in split.held_out_source for _ in seeds]
    ctl_caps = [p for p in split.held_out_control for _ in seeds]
    result = {
        "concept_rate": float(np.mean([shows_concept(i, c, split.concept) for i, c in zip(src, src_caps)])),
        "control_faithful": float(np.mean([faithful(i, parse(c)) for i, c in zip(ctl, ctl_caps)])),
        "source_faithful_except_concept": float(np.mean([
            shape_of(i, parse(c).background) == parse(c).shape if split.concept in COLOURS
            else colour_of(i, parse(c).background) == parse(c).colour for i, c in zip(src, src_caps)])),
        "_control_images": ctl,
    }
    if baseline is not None:
        result["control_drift"] = float(np.mean([pixel_drift(Image.fromarray(a), Image.fromarray(b))
                                                 for a, b in zip(ctl, baseline["_control_images"])]))
        result["control_identical"] = float(np.mean([np.array_equal(a, b) for a, b in zip(ctl, baseline["_control_images"])]))
    return result
