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
