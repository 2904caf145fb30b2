"""Attaching a Steering to a transformers causal LM for generation.

`Steering.attach` hooks the layers; this adds what a language model needs on top: the tokens of
each call are read from its `attention_mask` (padding never enters a gate's mean, left or right),
and the running gate state of each row is carried across the cached calls of one `generate()`
and cleared when a new sequence starts, so a new token's lambda costs O(1).

    with attach(steering, model, strength=1.0) as handle:
        out = model.generate(**inputs, max_new_tokens=20)
        handle.scales   # {layer name: (batch, tokens)}: every token but the last generated one

Each forward call without a past (a new `generate()`, a plain forward) starts a new sequence and
replaces the recorded lambdas. The running state follows the KV cache (`llm.sequence.follow_cache`):
beam search, which reorders the cache's rows, works under every gating mode (`causal`, the
language-model default that `fit_steering` writes, `token` and `sequence`); assisted generation
and prompt lookup, which crop it, work with `causal` and `token` gating and are refused with
`sequence` gating, which gates the tokens of one call together. One handle may serve several
threads at once; `handle.scales` holds the calling thread's lambdas.
"""

from __future__ import annotations

from torch import nn

from ..core import Steering, SteeringHandle
from .sequence import causal_lm_pre_forward


def attach(steering: Steering, model: nn.Module, strength: float = 1.0, **options) -> SteeringHandle:
    """Hook `steering` onto `model` until `handle.detach()` (or the end of a `with` block).

    `options` are those of `Steering.attach` (gated, gating, lambda_floor, skip_first_token,
    record_scales, layers, check_model). Detaching leaves the model exactly as it was.
    """
    if not isinstance(steering, Steering):
        raise TypeError(f"steering must be a dsas_diffusion.Steering, got {type(steering).__name__}; "
                        "load one with Steering.from_pretrained(path) or fit one with fit_steering")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch / transformers model, got {type(model).__name__}")
    if "pre_forward" in options:
        raise TypeError("attach() sets its own pre_forward (token masks and KV-cache state); to use yours, call "
                        "steering.attach(model, strength, pre_forward=...) instead")
    handle = steering.attach(model, strength, pre_forward=causal_lm_pre_forward(model), **options)
    handle.track_running = True
    return handle
