"""Counting what torch.compile builds: graphs (one per call of the backend) and graph breaks."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch._dynamo.utils import counters


@dataclass
class Compiled:
    graphs: int = 0
    breaks: dict = field(default_factory=dict)
    inputs: list = field(default_factory=list)  # how many inputs each graph takes, in the order built

    def backend(self, gm, example_inputs):  # the eager backend, counting the graphs handed to it
        self.graphs += 1
        self.inputs.append(len(example_inputs))
        return gm.forward


@contextmanager
def counting():
    """A fresh Dynamo (no graphs cached from earlier tests) and a counter of what it compiles."""
    torch._dynamo.reset()
    counters.clear()
    seen = Compiled()
    try:
        yield seen
    finally:
        seen.breaks = {reason.splitlines()[0]: n for reason, n in counters["graph_break"].items()}
        torch._dynamo.reset()


def generate_graphs(family: str, steered: bool) -> Compiled:
    """What a tiny language model of `family` builds compiled, under `generate()` over 3 batch sizes (other
    prompt lengths) and 3 strengths, 0 among them; steered, each call's recorded lambdas are checked to cover
    its rows (none are recorded at strength 0)."""
    from dsas_diffusion.llm import attach
    from tests.llm.tiny_lms import PROMPTS, fitted, generate, make_model, make_tokenizer

    tokenizer, model = make_tokenizer(), make_model(family)
    handle = attach(fitted(family), model, strength=2.0) if steered else None
    with counting() as seen:
        model.compile(backend=seen.backend)
        for rows, strength in ((2, 2.0), (3, 1.0), (1, 2.0), (2, 0.0)):
            if handle is not None:
                handle.strength = strength
            generate(model, tokenizer, PROMPTS[:rows])
            if handle is not None:  # the lambdas of every token were recorded from inside the graph
                assert all(lam.shape[0] == rows for lam in handle.scales.values())
                assert bool(handle.scales) == (strength != 0)
    if handle is not None:
        handle.detach()
    return seen


def shape_graphs(pipe, shapes, **call) -> Compiled:
    """What a pipeline's denoiser builds compiled, over calls at each (pixels, images per prompt) of `shapes`."""
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    with counting() as seen:
        denoiser.compile(backend=seen.backend)
        for pixels, images in shapes:
            pipe("a photo of a banana on a table", height=pixels, width=pixels, num_images_per_prompt=images,
                 generator=torch.Generator().manual_seed(0), **call)
    return seen
