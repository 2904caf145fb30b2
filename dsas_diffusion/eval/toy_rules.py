"""The `toy` scorer: the toy text-to-image world's exact pixel rules (dsas_diffusion/toy/t2i_world.py)
as a scorer, so `dsas eval` / `dsas sweep` measure the shipped checkpoint `assets/toy-t2i` with no
model at all.

Its prompts must be the world's captions ("a small red circle on a white background"): the
background they name is what the rules separate the shape from, so any other prompt is refused
before an image is drawn. Per image: the colour and shape read off the pixels (`toy_colour`,
`toy_shape`; None when no shape is found), `toy_faithful` (both are what the caption asked for)
and, given a concept (a colour or a shape), `toy_concept` (the image shows it).
"""

from __future__ import annotations

import numpy as np

from ..toy import t2i_world as world
from .scorers import Scorer, ScorerOptions, register_scorer

CONCEPTS = (*world.COLOURS, *world.SHAPES)  # what the rules can read


@register_scorer("toy")
class ToyScorer(Scorer):
    concept_hint = f"pass a concept of the toy world (--toy-concept, one of {', '.join(CONCEPTS)})"
    columns = (("toy_faithful", "toy_faithful", "rate", "faithful (toy rules)"),)

    def __init__(self, concept: str | None = None):
        if concept is not None and concept not in CONCEPTS:
            raise ValueError(f"toy concept {concept!r} is not a colour or shape of the toy world; pass one of "
                             f"{', '.join(CONCEPTS)}")
        self.toy_concept = concept

    @classmethod
    def load(cls, options: ScorerOptions) -> "ToyScorer":
        return cls(options.toy_concept)

    @classmethod
    def judges(cls, options: ScorerOptions) -> bool:
        return options.toy_concept is not None

    def settings(self) -> dict:
        return {"toy_concept": self.toy_concept}

    def check_prompts(self, prompts):
        for prompt in prompts:
            self._scene(prompt)

    def score(self, images, prompts, twins):
        out = []
        for image, prompt in zip(images, prompts):
            scene = self._scene(prompt)
            pixels = np.asarray(image.convert("RGB"))
            colour, shape = world.colour_of(pixels, scene.background), world.shape_of(pixels, scene.background)
            fields = {"toy_colour": colour, "toy_shape": shape,
                      "toy_faithful": colour == scene.colour and shape == scene.shape}
            if self.toy_concept is not None:
                fields["toy_concept"] = self.toy_concept in (colour, shape)
            out.append(fields)
        return out

    def concept(self, fields: dict) -> tuple[float, bool]:
        if self.toy_concept is None:
            return super().concept(fields)
        return float(fields["toy_concept"]), fields["toy_concept"]

    @staticmethod
    def _scene(prompt: str):
        try:  # either world's captions: the UNet world's one template, or any DiT-world phrasing
            scene = world.read_caption(prompt)
        except (StopIteration, ValueError, IndexError):
            scene = None
        known = scene is not None and scene.background in world.BACKGROUNDS
        if not known or prompt not in (scene.caption, *world.phrasings(scene)):
            example = world.all_scenes()[0].caption
            raise ValueError(f"the toy scorer reads only captions of the toy world, like {example!r}; the prompt "
                             f"{prompt!r} is not one: use the toy world's captions, or other scorers")
        return scene
