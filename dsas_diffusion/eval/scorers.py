"""Scorers: the ways an image is judged (CLIP, NudeNet, the toy world's pixel rules), one class and a
registration each, loaded and checked before any image is generated.

    options = ScorerOptions(clip_model="path/to/clip", toy_concept="red")
    judge = concept_judge(["clip", "toy"], options)     # "toy": whose decision is the concept rate
    scorers = load_scorers(["clip", "toy"], options)
    fields = scorers[0].score(images, prompts, twins)

A scorer turns a batch of images (with their prompts, and for each the index of its unsteered twin in
the batch, or None) into one dict of fields per image, under its own keys. A scorer that can tell
whether an image shows the concept (`judges(options)`) also gives `concept(fields)`: (probability,
decision); the judge's pair becomes the run's `concept_prob` / `is_concept`, so concept rates and
Pareto fronts read the same keys whichever judge was chosen. `columns` say what the summary of a run
shows of its fields: (summary key, field, "mean" or "rate", header). `settings()` is what its scores depend
on besides image and prompt (a score made otherwise is never reused); `check_prompts` refuses prompts
the scorer cannot read before anything is drawn.

Built-in scorers register in `clip_score.py` (clip), `nudity.py` (nudenet) and `toy_rules.py` (toy).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from PIL import Image

from ..core.fit_inputs import positive_int, real_number
from .concept import check_concept_texts

S = TypeVar("S", bound="type[Scorer]")

SCORERS: dict[str, type["Scorer"]] = {}


@dataclass(frozen=True)
class ScorerOptions:
    """Everything any scorer may be loaded with; each takes the fields it needs."""

    clip_backend: str = "transformers"
    clip_model: str | None = None
    device: str | torch.device = "cpu"
    dtype: torch.dtype = torch.float32
    batch_size: int = 32
    concept: Sequence[str] = field(default_factory=tuple)
    anti_concept: Sequence[str] = field(default_factory=tuple)
    concept_threshold: float = 0.5
    nudity_threshold: float = 0.6
    toy_concept: str | None = None

    def __post_init__(self):
        for name in ("concept_threshold", "nudity_threshold"):
            real_number(name, getattr(self, name), 0, 1, low_open=True, high_open=True, fix="; pass e.g. 0.5")
        positive_int("batch_size", self.batch_size)
        if self.concept or self.anti_concept:
            check_concept_texts(self.concept, self.anti_concept)


class Scorer(ABC):
    """One way of judging images; subclasses get `name` by registering, and implement `load` and `score`."""

    name: str = ""
    concept_hint: str = "it never judges a concept"  # what it needs to judge one, for error messages
    columns: tuple[tuple[str, str, str, str], ...] = ()

    @classmethod
    @abstractmethod
    def load(cls, options: ScorerOptions) -> "Scorer":
        """The scorer ready to run, or an error saying what to install or pass."""

    @classmethod
    def judges(cls, options: ScorerOptions) -> bool:
        """Whether this scorer, loaded with `options`, tells if an image shows the concept (known before loading)."""
        return False

    def settings(self) -> dict:
        return {}

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Refuse, before generating, prompts this scorer cannot judge (every prompt is fine by default)."""

    @abstractmethod
    def score(self, images: list[Image.Image], prompts: list[str], twins: list[int | None]) -> list[dict]:
        """One dict of fields per image, under this scorer's own keys."""

    def concept(self, fields: dict) -> tuple[float, bool]:
        """(probability that the image shows the concept, whether it does) from this scorer's fields."""
        raise ValueError(f"the {self.name} scorer cannot judge the concept: {self.concept_hint}")


def register_scorer(name: str) -> Callable[[S], S]:
    """Class decorator: `@register_scorer("name")` makes a `Scorer` subclass loadable by that name."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_scorer needs a name that is an identifier, e.g. 'clip'; got {name!r}")

    def register(cls: S) -> S:
        if SCORERS.get(name, cls) is not cls:
            raise ValueError(f"scorer {name!r} is already registered to {SCORERS[name].__name__}; choose another name")
        cls.name = name
        SCORERS[name] = cls
        return cls

    return register


def load_scorers(names: Sequence[str], options: ScorerOptions) -> list[Scorer]:
    """The named scorers, each loaded (so a missing package or model fails here, before any image)."""
    if not names:
        raise ValueError(f"no scorer given; choose from {sorted(SCORERS)}, e.g. ['clip']")
    unknown = [n for n in names if n not in SCORERS]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a scorer; choose from {sorted(SCORERS)} (asked for {list(names)})")
    return [SCORERS[n].load(options) for n in dict.fromkeys(names)]


def concept_judge(names: Sequence[str], options: ScorerOptions, name: str | None = None) -> str | None:
    """Which of the scorers `names` decides the concept rate: `name`, else the first that judges a concept
    with these options (None when none does). Known before any scorer is loaded."""
    if name is None:
        return next((n for n in names if n in SCORERS and SCORERS[n].judges(options)), None)
    if name not in names:
        raise ValueError(f"the concept judge {name!r} is not among the scorers {list(names)}; add it to the scorers "
                         "or choose one of them")
    if not SCORERS[name].judges(options):
        raise ValueError(f"the {name} scorer cannot judge the concept: {SCORERS[name].concept_hint}")
    return name
