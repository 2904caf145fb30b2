"""What one thread's calls through a steering handle have to themselves, and how it follows a KV cache.

A steered model may run in several threads at once (a server, two pipelines sharing modules).
Everything a call reads or writes (masks, batch rows, the running gate state, recorded lambdas,
the options a pipeline switches on for its call) lives in a `SteeringCall`, one per thread and
handle, so concurrent calls give exactly what the same calls give one after the other.

With a KV cache the running gate state of a row belongs to that row's cached sequence. Decoding
that moves the cache's rows (beam search reorders them, contrastive search selects and repeats
them) must move the state with them, and decoding that crops the cache (assisted generation,
prompt lookup) must take the state back to the kept length: `Sequence` does both for the cache
it follows (`llm.sequence.follow_cache` wires it to the cache's own methods).
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch

from .hooks import CallState, steered_positions

State = tuple[torch.Tensor, torch.Tensor]  # running (mean of logits, count of real tokens), each (B, 1, 1)
RowMap = Callable[[torch.Tensor], torch.Tensor]  # the same move of the batch rows (dim 0), for any tensor


def moved_states(states: dict[str, State], move: RowMap) -> dict[str, State]:
    """Every layer's running (mean, count) with its rows moved by `move`."""
    return {name: (move(mean), move(count)) for name, (mean, count) in states.items()}


@dataclass(frozen=True)
class RowsMoved:
    """A marker among a layer's recorded lambdas: the rows recorded before it moved like this."""

    move: RowMap


class SteeringCall(CallState):
    """The per-thread state of a `SteeringHandle`: see the module docstring."""

    def __init__(self):
        super().__init__()
        self.run = None  # the options this thread's calls run with (`runtime._Run`): the handle's, or its own
        self.continuing = False  # this call extends the sequence of the previous one (KV cache)
        self.length: int | None = None  # tokens of that sequence after the last call; None: unknown
        self.running: dict[str, State] = {}
        # to go back within the last call when the KV cache is cropped: the running state as the call began
        # (taken eagerly when a forward begins, so a compiled decoding step does not store it per layer, which
        # Dynamo replayed after the graph), its new tokens, and, for a call of several tokens, each layer's
        # logits (B, K, 1)
        self.before: dict[str, State] = {}
        self.tokens: int | None = None
        self.undo: dict[str, torch.Tensor] = {}
        self.positions: list = []  # ((kind, B, K, fresh), `Positions`) of the current forward, shared by its layers
        self.history: dict[str, list] = defaultdict(list)  # (B, K, 1) lambdas per call, and `RowsMoved` markers
        self.pending: dict[str, torch.Tensor] = {}  # lambdas a compiled forward returned, for `history` after it
        self.sequence: Sequence | None = None  # the cached sequence under way, once a cache is followed

    def clear(self) -> None:
        """Forget the sequence under way; the cache it followed no longer moves this state, and keeps the
        state as it was (`Sequence.state`) for its copies."""
        if self.sequence is not None:
            self.sequence.leave()
        self.running.clear()
        self.before.clear()
        self.tokens = None
        self.undo.clear()
        self.positions.clear()
        self.history.clear()
        self.pending.clear()
        self.length = None
        self.sequence = None


class Sequence:
    """Keeps a `SteeringCall`'s running state in step with the rows and length of one KV cache.

    It moves the call's state only while it is its call's current sequence. When the thread goes on
    with another cache, it keeps the state it reached (`state`), moved with its cache's rows and
    forgotten on a crop, for the call that takes its cache, or a copy of it, up again.
    """

    def __init__(self, call: SteeringCall, gating: str, cache, skip_first: bool = False, owner=None):
        self.call, self.gating, self.skip_first = call, gating, skip_first
        self.cache = weakref.ref(cache)  # which cache it follows, without keeping that cache alive
        # the steering handle whose state this is (a key: a copy of the cache carries the state), held weakly: a cache
        # kept alive must not keep a detached handle and its model
        self.owner = None if owner is None else weakref.ref(owner)
        self.refused: str | None = None  # why the state could not follow the cache; later calls of it fail too
        self._left: tuple | None = None  # (length, running state) when another sequence took the call over

    def leave(self) -> None:
        """Another sequence takes the call over: keep the state this one reached, for copies of its cache."""
        if self.live and self._left is None:
            self._left = (self.call.length, dict(self.call.running))

    def moved_while_left(self, move: RowMap | None) -> None:
        """The cache's rows moved (`move`) or it was cropped (None: the state is no longer known) after the call
        left this sequence: the state it left moves alike, for the call that takes the cache up again."""
        if self._left is not None:
            length, running = self._left
            self._left = None if move is None else (length, moved_states(running, move))

    def state(self) -> tuple[int, dict[str, State]] | None:
        """(tokens, running state) this sequence's cache holds a state for: the call's while it is live, the state
        it reached when it was left otherwise; None where unknown or refused. The cache taken up again after
        another one (two sequences interleaved in one thread), or a copy of it (a reused prompt cache),
        continues from it."""
        if self.refused is not None:
            return None
        length, running = (self.call.length, self.call.running) if self.live else (self._left or (None, None))
        return None if length is None else (length, dict(running))

    @property
    def live(self) -> bool:
        return self.call.sequence is self

    def rows_moved(self, move: RowMap) -> None:
        """The cache's rows moved (reordered, selected or repeated): move every per-row tensor alike."""
        call = self.call
        call.running.update(moved_states(call.running, move))
        call.before.update(moved_states(call.before, move))
        for name, proj in list(call.undo.items()):
            call.undo[name] = move(proj)
        if call.valid is not None:
            call.valid = move(call.valid)
        if call.rows is not None:
            call.rows = move(call.rows)
        call.positions.clear()
        for chunks in call.history.values():
            chunks.append(RowsMoved(move))  # applied when `scales` is read, not on every step

    def cropped(self, removed: int) -> None:
        """The cache dropped its last `removed` tokens: go back to the state at the kept length, or refuse."""
        call = self.call
        if removed > 0 and (call.running or call.before):
            # the positions the steered layers saw, else the tokens the pre_forward counted (the call steered none)
            k = next(iter(call.undo.values())).shape[1] if call.undo else call.tokens if call.tokens is not None else 1
            if (self.gating == "sequence" and k > 1 or removed > k) and not call.run.active:
                # strength 0 steers nothing (compiled, its state moves all the same): the state goes, as the stock
                # model refuses no crop
                call.running.clear()
                call.before.clear()
                call.undo.clear()
            elif self.gating == "sequence" and k > 1:
                self._refuse(
                    "gating='sequence' cannot follow a KV cache that is cropped after a call of several tokens: the "
                    "tokens of one call share one gate decision, so the tokens the crop keeps were gated together "
                    "with the ones it removes (assisted generation and prompt-lookup decoding do this). Use "
                    "gating='causal' (the language-model default) or 'token', which follow such crops exactly, or "
                    "decode without an assistant model / prompt_lookup_num_tokens")
            elif removed > k:
                self._refuse(
                    f"the KV cache was cropped by {removed} tokens, but the running gate state ({self.gating} gating) "
                    f"can only go back within the last forward call ({k} tokens): crop at most that many tokens "
                    "after a call, or start a new generation")
            else:
                self._go_back(k - removed)
        if removed > 0:
            for chunks in call.history.values():
                _drop_last_tokens(chunks, removed)
            if call.length is not None:
                call.length -= removed

    def _go_back(self, kept: int) -> None:
        call = self.call
        valid = call.valid
        for name in {**call.running, **call.before}:
            prior, proj = call.before.get(name), call.undo.get(name)
            if kept == 0 or proj is None:  # back to where the call began; or a layer the call did not move
                if prior is None:
                    call.running.pop(name, None)
                else:
                    call.running[name] = prior
            else:
                # the positions the call counted: its first token is not, when the call started the sequence
                counted = steered_positions(None if valid is None else valid[:, :kept], proj.shape[0], kept,
                                            proj.device, self.skip_first and prior is None)
                v = None if counted is None else counted.to(device=proj.device, dtype=proj.dtype).unsqueeze(-1)
                part = proj[:, :kept]
                total = (part if v is None else torch.where(v > 0, part, 0.0)).sum(1, keepdim=True)
                count = torch.full_like(total, float(kept)) if v is None else v.sum(1, keepdim=True)
                if prior is not None:
                    total, count = torch.addcmul(total, prior[0], prior[1]), count + prior[1]
                call.running[name] = (total / count.clamp_min(1), count)
            if proj is not None:
                call.undo[name] = proj[:, :kept]
        call.tokens = kept
        if valid is not None:
            call.valid = valid[:, :kept]
        call.positions.clear()

    def _refuse(self, message: str) -> None:
        self.refused = message
        raise ValueError(message)


def _drop_last_tokens(chunks: list, n: int) -> None:
    """Remove the lambdas of the last `n` tokens from a layer's recorded (B, K, 1) chunks."""
    i = len(chunks) - 1
    while n > 0 and i >= 0:
        chunk = chunks[i]
        if isinstance(chunk, torch.Tensor):
            keep = max(chunk.shape[1] - n, 0)
            n -= chunk.shape[1] - keep
            if keep:
                chunks[i] = chunk[:, :keep]
            else:
                del chunks[i]
        i -= 1


def joined(chunks: list, spatial: bool) -> torch.Tensor:
    """A layer's recorded lambdas as one tensor: (B, tokens) joined along tokens, or (calls, B, positions)
    for spatial layers; rows recorded before a `RowsMoved` marker are moved as the cache's were."""
    done: list[torch.Tensor] = []
    for chunk in chunks:
        if isinstance(chunk, RowsMoved):
            done = [chunk.move(t) for t in done] if spatial else [chunk.move(torch.cat(done, 1))] if done else []
        else:
            done.append(chunk)
    if spatial:
        return torch.stack(done).squeeze(-1)
    return torch.cat(done, dim=1).squeeze(-1)
