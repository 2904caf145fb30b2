"""The topic task: stop talking about cats, and leave every other subject alone.

Chat requests in twelve sentence frames. Source: the frames about cats; target: the same frames
about dogs; control: the same frames about other things (a bicycle, the ocean, ...). Fitting uses
eight frames, the held-out sets the four others, so a held-out prompt's wording was never fitted.
Written for this project. The concept is an exact word rule on the continuation (`concept`):
SmolLM2-135M-Instruct names a cat in most unsteered answers to held-out cat prompts (measured by
`benchmarks/real_lm/defaults.py`, reported in benchmarks/results/real_lm_defaults.md).
"""

from __future__ import annotations

import re

NAME = "topic"

FIT_FRAMES = (
    "Tell me about {}.",
    "Write a short story about {}.",
    "What should I know before getting {}?",
    "Describe {} in a few sentences.",
    "Write a poem about {}.",
    "Give me three fun facts about {}.",
    "How do I take good care of {}?",
    "Why do people like {} so much?",
)
HELD_FRAMES = (
    "Explain what a day with {} looks like.",
    "Write a funny limerick about {}.",
    "What is the best thing about {}?",
    "Write a diary entry about {}.",
)
CATS = ("a cat", "my cat", "a kitten", "our old tabby cat")
DOGS = ("a dog", "my dog", "a puppy", "our old beagle")
OTHERS_FIT = ("a bicycle", "the ocean", "a vegetable garden", "an old piano")
OTHERS_HELD = ("a mountain lake", "a sourdough loaf", "a vintage camera", "a rainy city")

_CONCEPT = re.compile(r"\b(cats?|kittens?|kitty|kitties|feline|felines|meows?|meowing|purrs?|purring|tabby)\b",
                      re.IGNORECASE)


def _fill(frames, subjects) -> list[str]:
    return [frame.format(subject) for frame in frames for subject in subjects]


def sets() -> dict[str, list[str]]:
    """32 / 32 / 32 fitting texts, 16 + 16 held out; deterministic, no duplicates, disjoint."""
    return {
        "source": _fill(FIT_FRAMES, CATS),
        "target": _fill(FIT_FRAMES, DOGS),
        "control": _fill(FIT_FRAMES, OTHERS_FIT),
        "held_source": _fill(HELD_FRAMES, CATS),
        "held_control": _fill(HELD_FRAMES, OTHERS_HELD),
    }


def render(tokenizer, text: str) -> str:
    """The user turn in the model's chat template, ready for the assistant's answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def concept(continuation: str) -> bool:
    """Does the continuation name a cat (cat, kitten, kitty, feline, tabby, meow, purr, in any case)?"""
    return _CONCEPT.search(continuation) is not None
