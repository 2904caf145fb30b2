"""Measuring steering in the toy text-to-image world: concept rate on source prompts, and damage
on control prompts (pixel drift from their unsteered twins, and whether they still show what
their caption asked for). Everything is read off the pixels by the world's exact rules.
`concept_split` gives the UNet world's prompts; `phrased_concept_split` the DiT world's, whose
held-out scenes are also asked for in phrasings no fitting prompt uses."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..eval.drift import pixel_drift

from .t2i_world import (COLOURS, FIT_TEMPLATES, HELD_OUT_TEMPLATES, SHAPES, Scene, all_scenes, colour_of, faithful,
                        phrase, read_caption, shape_of, words_for)


@dataclass
class ConceptSplit:
    """Prompts to fit a steering on, and held-out prompts to measure it on."""

    concept: str
    source: list[str]
    target: list[str]
    control: list[str]
    held_out_source: list[str]
    held_out_control: list[str]
    # the DiT world only: the held-out scenes in phrasings never used for fitting
    paraphrased_source: list[str] = field(default_factory=list)
    paraphrased_control: list[str] = field(default_factory=list)

    def paraphrased(self) -> "ConceptSplit":
        """This split with the paraphrased prompts as its held-out ones (what `measure` reads)."""
        return ConceptSplit(self.concept, self.source, self.target, self.control, self.paraphrased_source,
                            self.paraphrased_control)


def _has(scene: Scene, concept: str) -> bool:
    return concept in (scene.colour, scene.shape)


def _scenes(concept: str, held_out: float, seed: int) -> tuple[list[Scene], list[Scene], list[Scene], list[Scene]]:
    """(fit source, fit control, held-out source, held-out control) scenes: a third of each held out."""
    if concept not in COLOURS and concept not in SHAPES:
        raise ValueError(f"concept {concept!r} is neither a colour {list(COLOURS)} nor a shape {list(SHAPES)}")
    rng = random.Random(seed)
    with_c = [s for s in all_scenes() if _has(s, concept)]
    without = [s for s in all_scenes() if not _has(s, concept)]
    rng.shuffle(with_c)
    rng.shuffle(without)
    n_s, n_c = round(len(with_c) * held_out), round(len(without) * held_out)
    return with_c[n_s:], without[n_c:], with_c[:n_s], without[:n_c]


def concept_split(concept: str, replacement: str, held_out: float = 0.34, seed: int = 0) -> ConceptSplit:
    """Source: captions with the concept (a colour or a shape); target: the same captions with
    `replacement`; control: captions without it. A third of each is held out for measuring."""
    fit_s, fit_c, held_s, held_c = _scenes(concept, held_out, seed)
    return ConceptSplit(
        concept=concept,
        source=[s.caption for s in fit_s],
        target=[s.caption.replace(f" {concept} ", f" {replacement} ") for s in fit_s],
        control=[s.caption for s in fit_c],
        held_out_source=[s.caption for s in held_s],
        held_out_control=[s.caption for s in held_c],
    )


def _swap(scene: Scene, concept: str, replacement: str) -> Scene:
    return Scene(replacement if scene.colour == concept else scene.colour,
                 replacement if scene.shape == concept else scene.shape, scene.size, scene.background)


def _paraphrases(scene: Scene, rng: random.Random) -> list[str]:
    """`scene` in each held-out template, with a synonym (never the plain word) where its colour or shape has one."""
    def word(name: str) -> str:
        return rng.choice(words_for(name)[1:] or words_for(name))
    return [phrase(scene, t, word(scene.colour), word(scene.shape)) for t in HELD_OUT_TEMPLATES]


def phrased_concept_split(concept: str, replacement: str, held_out: float = 0.34, seed: int = 0) -> ConceptSplit:
    """The DiT world's split: the same scenes as `concept_split`, fitted in every fitting template with
    the plain words; held out in the plain template (`held_out_*`) and in the held-out templates with
    synonyms (`paraphrased_*`), phrasings no fitting prompt uses."""
    fit_s, fit_c, held_s, held_c = _scenes(concept, held_out, seed)
    rng = random.Random(seed)
    return ConceptSplit(
        concept=concept,
        source=[phrase(s, t) for s in fit_s for t in FIT_TEMPLATES],
        target=[phrase(_swap(s, concept, replacement), t) for s in fit_s for t in FIT_TEMPLATES],
        control=[phrase(s, t) for s in fit_c for t in FIT_TEMPLATES],
        held_out_source=[s.caption for s in held_s],
        held_out_control=[s.caption for s in held_c],
        paraphrased_source=[p for s in held_s for p in _paraphrases(s, rng)],
        paraphrased_control=[p for s in held_c for p in _paraphrases(s, rng)],
    )


def shows_concept(image: np.ndarray, caption: str, concept: str) -> bool:
    scene = read_caption(caption)
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
        "control_faithful": float(np.mean([faithful(i, read_caption(c)) for i, c in zip(ctl, ctl_caps)])),
        # colour alone: the DiT world draws colours far more reliably than shapes
        "control_colour_right": float(np.mean([colour_of(i, read_caption(c).background) == read_caption(c).colour
                                               for i, c in zip(ctl, ctl_caps)])),
        "source_faithful_except_concept": float(np.mean([
            shape_of(i, read_caption(c).background) == read_caption(c).shape if split.concept in COLOURS
            else colour_of(i, read_caption(c).background) == read_caption(c).colour for i, c in zip(src, src_caps)])),
        "_control_images": ctl,
    }
    if baseline is not None:
        result["control_drift"] = float(np.mean([pixel_drift(Image.fromarray(a), Image.fromarray(b))
                                                 for a, b in zip(ctl, baseline["_control_images"])]))
        result["control_identical"] = float(np.mean([np.array_equal(a, b) for a, b in zip(ctl, baseline["_control_images"])]))
    return result
