"""Which tokens of a causal-LM forward call are real, and whether the call starts a new sequence.

The hooks need both: padding must never enter a gate's mean, and with a KV cache each call
continues the sequence of the previous one, so the per-row running (mean, count) of gate logits
must survive between calls and be cleared when a new sequence begins.

Reads the arguments a transformers causal LM receives (`attention_mask`, `input_ids` /
`inputs_embeds`, `cache` / `past_key_values`) by name only and imports nothing from
transformers: `Steering.attach` applies it by default to a model attached under its own module
names whose forward takes an `attention_mask`, as every transformers language model's does.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .hooks import HookSet, PreForward


def _positional_names(model: nn.Module) -> list[str]:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return ["input_ids"]
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds]


def cache_length(cache) -> int:
    """Tokens already held by a KV cache: a transformers `Cache`, a legacy tuple, or None."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:  # legacy ((key, value), ...) with key (B, heads, past, head_dim)
        return int(cache[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


def call_tokens(kwargs: dict) -> tuple[torch.Tensor | None, int]:
    """(valid mask (B, K) of this call's tokens or None for all real, tokens already in the cache).

    With a KV cache, generate() passes the mask of the whole sequence (B, past + K); this call's
    tokens are its last K columns. The past length is read from the mask's shape when there is
    one (no host-device synchronisation), else from the cache.
    """
    x = kwargs.get("input_ids")
    if not isinstance(x, torch.Tensor):
        x = kwargs.get("inputs_embeds")
    k = x.shape[1] if isinstance(x, torch.Tensor) and x.dim() >= 2 else None
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and k is not None and mask.shape[1] >= k:
        return mask[:, mask.shape[1] - k:].bool(), mask.shape[1] - k
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return None, cache_length(cache)


def takes_attention_mask(model: nn.Module) -> bool:
    try:
        return "attention_mask" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def causal_lm_pre_forward(model: nn.Module) -> PreForward:
    """A `pre_forward` for hooks on `model`: sets `hooks.valid` from the attention mask and, on a
    steering handle, keeps the running gate state across cached calls of one sequence and clears
    it (and the recorded lambdas) when a call starts a new one."""
    names = _positional_names(model)

    def pre_forward(hooks: HookSet, args: tuple, kwargs: dict) -> None:
        valid, past = call_tokens({**dict(zip(names, args)), **kwargs})
        hooks.valid = valid
        if hasattr(hooks, "running"):  # a SteeringHandle, not an ActivationCapture
            hooks.track_running = True
            hooks.continuing = past > 0
            if past == 0:
                hooks.running.clear()
                hooks.history.clear()

    return pre_forward
