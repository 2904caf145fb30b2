"""Which tokens of a causal-LM forward call are real, and whether the call starts a new sequence.

The hooks need both: padding must never enter a gate's mean, and with a KV cache each call
continues the sequence of the previous one, so the per-row running (mean, count) of gate logits
must survive between calls and be cleared when a new sequence begins. It must also follow the
cache: `follow_cache` makes a transformers `Cache` move the state's rows when it moves its own
(beam search: `reorder_cache`) and take the state back when it is cropped (assisted generation).

Reads the arguments a transformers causal LM receives (`attention_mask`, `input_ids` /
`inputs_embeds`, `cache` / `past_key_values`) by name only and imports nothing from
transformers. These are a language model's conventions, so they live here and not in the core:
this module registers `causal_lm_pre_forward` as the default `pre_forward` of `Steering.attach`
for a model attached under its own module names whose forward takes an `attention_mask`, as
every transformers language model's does (`core.steering.register_default_pre_forward`).
"""

from __future__ import annotations

import copy
import inspect
import weakref

import torch
from torch import nn

from ..core.call_state import moved_states
from ..core.hooks import HookSet, PreForward
from ..core.steering import register_default_pre_forward


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
    k = _new_tokens(kwargs)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and k is not None and mask.shape[1] >= k:
        # copied out, not a view: a view keeps the mask's row stride, which grows every decoding step, and a
        # compiled step would take it (and the running state computed from it) as a symbol to guard on
        valid = torch.empty(mask.shape[0], k, dtype=torch.bool, device=mask.device)
        return valid.copy_(mask[:, mask.shape[1] - k:]), mask.shape[1] - k
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return None, cache_length(cache)


def _new_tokens(kwargs: dict) -> int | None:
    x = kwargs.get("input_ids")
    if not isinstance(x, torch.Tensor):
        x = kwargs.get("inputs_embeds")
    return x.shape[1] if isinstance(x, torch.Tensor) and x.dim() >= 2 else None


def takes_attention_mask(model: nn.Module) -> bool:
    try:
        return "attention_mask" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def causal_lm_pre_forward(model: nn.Module) -> PreForward:
    """A `pre_forward` for hooks on `model`: sets `hooks.valid` from the attention mask and, on a
    steering handle, keeps the running gate state across cached calls of one sequence, moves it
    with the cache's rows, and clears it (and the recorded lambdas) when a call starts a new one."""
    names = _positional_names(model)

    # runs eagerly before a compiled forward, as every root pre-hook does (`HookSet._attach`): it keeps
    # Python state (the sequence, the cache it follows) that a graph would have to guard on
    def pre_forward(hooks: HookSet, args: tuple, kwargs: dict) -> None:
        named = {**dict(zip(names, args)), **kwargs}
        valid, past = call_tokens(named)
        hooks.valid = valid
        sequence_call = getattr(hooks, "sequence_call", None)  # a SteeringHandle, not an ActivationCapture
        if sequence_call is not None:
            cache = named.get("cache", named.get("past_key_values"))
            followed = hooks.call.sequence
            other = cache is not None and (followed is None or followed.cache() is not cache)
            call = sequence_call(past, _new_tokens(named), carried_state(cache, hooks) if other and past else None)
            # decided after the call: a sequence that starts anew (an emptied cache filled again) is followed too
            if cache is not None and (call.sequence is None or call.sequence.cache() is not cache):
                follow_cache(cache, hooks, call)

    return pre_forward


_FOLLOWERS = "_dsas_steering_followers"
# the cache methods that move its batch rows, and the same move for any (B, ...) tensor
_ROW_MOVES = {
    "reorder_cache": lambda beam_idx: lambda t: t.index_select(0, torch.as_tensor(beam_idx, device=t.device)),
    "batch_select_indices": lambda indices: lambda t: t[torch.as_tensor(indices, device=t.device)],
    "batch_repeat_interleave": lambda repeats: lambda t: t.repeat_interleave(repeats, dim=0),
}


@torch.compiler.disable  # wraps Python methods of the cache: nothing for a graph, and only once per sequence
def follow_cache(cache, handle, call) -> None:
    """Make `cache` keep the running gate state of `call` (a thread's state of steering `handle`) in
    step with its own rows and length: after each `reorder_cache` / `batch_select_indices` /
    `batch_repeat_interleave` the state's rows move alike, after a `crop` the state goes back to the
    kept length (or the crop is refused with a ValueError where that cannot be exact).

    The cache's methods are wrapped on the instance, once; each sequence that uses the cache adds
    itself to the list they notify. A copy of the cache (`copy.deepcopy`) gets wrappers of its own
    and no followers. A cache that cannot move its rows in place (a legacy tuple, which current
    transformers no longer accept) is left alone."""
    if not hasattr(cache, "reorder_cache") or not hasattr(cache, "__dict__"):
        return
    sequence = handle.new_sequence(call, cache)
    followers = cache.__dict__.get(_FOLLOWERS)
    if followers is None:
        followers = _Followers()
        for method in (*_ROW_MOVES, "crop"):
            if callable(getattr(cache, method, None)):
                setattr(cache, method, _Notifying(cache, method, cache.__dict__.get(method)))
        setattr(cache, _FOLLOWERS, followers)
    followers[:] = [f for f in followers if f.live] + [sequence]


def carried_state(cache, handle) -> tuple | None:
    """(tokens, running state) of `handle` that `cache` carries: the state its own sequence reached before the
    thread went on with another cache (two sequences interleaved), else the state of the sequence the cache
    was copied from, as it was when copied (a reused prompt cache continues the prompt's state); None if none."""
    followers = getattr(cache, "__dict__", {}).get(_FOLLOWERS)
    if not isinstance(followers, _Followers):
        return None
    for sequence in reversed(followers):
        if sequence.owner is not None and sequence.owner() is handle and not sequence.live:
            state = sequence.state()
            if state is not None:
                return state
    found = followers.carried.get(id(handle))
    return found[1] if found is not None and found[0]() is handle else None


class _Followers(list):
    """The sequences a cache notifies; a copy of the cache starts with none (nothing follows it yet), and
    carries the state each handle's sequence had reached on the original (`carried`, by handle)."""

    def __init__(self, carried: dict | None = None):
        super().__init__()
        self.carried: dict[int, tuple] = carried or {}  # id(handle): (weakref to it, (tokens, running state))

    def _copy(self) -> "_Followers":
        carried = dict(self.carried)
        for sequence in self:
            state, owner = sequence.state(), sequence.owner and sequence.owner()
            if state is not None and owner is not None:
                carried[id(owner)] = (weakref.ref(owner), state)
        return _Followers(carried)

    def rows_moved(self, move) -> None:
        """The cache's rows moved: so do those of the states it holds for calls not on it now (what a copy
        carries, what a sequence left), for the call that continues it."""
        for key, (owner, (length, running)) in list(self.carried.items()):
            self.carried[key] = (owner, (length, moved_states(running, move)))
        for sequence in self:
            if not sequence.live:
                sequence.moved_while_left(move)

    def cropped(self) -> None:
        """The cache dropped tokens: the states it holds for calls not on it now are of a longer sequence, so
        they go."""
        self.carried.clear()
        for sequence in self:
            if not sequence.live:
                sequence.moved_while_left(None)

    def __copy__(self):
        return self._copy()

    def __deepcopy__(self, memo):
        return self._copy()


class _Notifying:
    """A cache method that runs as before, then tells the cache's live followers what it did."""

    def __init__(self, cache, method: str, own=None):
        self.cache, self.method, self.own = cache, method, own  # `own`: an instance override it replaces

    def _run(self, *args, **kwargs):
        if self.own is not None:
            return self.own(*args, **kwargs)
        return getattr(type(self.cache), self.method)(self.cache, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        every = self.cache.__dict__.get(_FOLLOWERS, _Followers())
        followers = [f for f in every if f.live]
        if self.method == "crop":
            before = cache_length(self.cache)
            out = self._run(*args, **kwargs)
            removed = before - cache_length(self.cache)
            if removed:
                every.cropped()
            for follower in followers:
                follower.cropped(removed)
            return out
        out = self._run(*args, **kwargs)
        move = _ROW_MOVES[self.method](*args, **kwargs)
        every.rows_moved(move)
        for follower in followers:
            follower.rows_moved(move)
        return out

    def __deepcopy__(self, memo):
        """A deep copy of the cache holds a copy of this: the same method, of the copy."""
        copied = memo.get(id(self.cache))
        own = None if self.own is None else copy.deepcopy(self.own, memo)
        return _Notifying(copied if copied is not None else self.cache, self.method, own)


@register_default_pre_forward
def _for_causal_lm(model: nn.Module) -> PreForward | None:
    return causal_lm_pre_forward(model) if takes_attention_mask(model) else None
