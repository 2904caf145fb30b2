"""Applying a fitted Steering: the DSAS rule x' = x + alpha * lambda * (T(x) - x) in forward hooks.

Per position the gate costs one dot product: the logit of a mean of activations is the mean of
the per-position logits (the gate is linear before the sigmoid), so the pooled modes only pool
the scalar projections, and a KV-cached token updates a running (mean, count) per row in O(1).

What depends only on the positions of a call (real tokens, running counts, the masks of the first
token and of leading padding) is the same for every hooked layer, so it is computed once per
forward call (`positions`) and each layer pays only its own few ops (`layer_lambdas`): on a
cached decoding step with a mean shift, a dot product, a lerp, a sigmoid and one addcmul.
No host-device synchronisation and no Python loop over positions happen on this path.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F

from .call_state import Sequence, SteeringCall, State, joined
from .config import Gating, LayerKind
from .gate import Gate
from .hooks import HookSet, PreForward, as_tokens
from .maps import SteeringMap
from .options import RunOptionAttributes, RunOptions, check_bool, check_strength

if TYPE_CHECKING:
    from .steering import Steering


@dataclass
class Positions:
    """Facts about one call's positions that every hooked layer shares.

    Tensors carry a trailing axis of 1, the shape of a per-position scale over (B, K, D)
    activations, so no layer pays for reshaping them.
    """

    valid: torch.Tensor | None  # (B, K, 1) float, 1.0 for real tokens; None when every token is real
    prior: torch.Tensor | None  # (B, 1, 1) real tokens seen in earlier calls of the sequence; None: it starts here
    count: torch.Tensor  # (B, 1, 1) real tokens so far, this call included: the running count after it
    divisor: torch.Tensor  # (B, 1, 1) the count, at least 1: the mean's divisor
    step: torch.Tensor | None  # (B, 1, 1) weight of a single new token in the running mean (cached decoding)
    seen: torch.Tensor | None  # (B, K, 1) real tokens so far at each position, at least 1: the causal divisor
    drop: torch.Tensor | None  # (B, K, 1) bool, lambda forced to 0: the first token, leading padding
    pad: torch.Tensor | None  # (B, K, 1) bool, padding that takes the sequence decision (token gating)
    rows: torch.Tensor | None  # (B, 1, 1) float, 1.0 for the batch rows to steer; None: all


def positions(
    b: int,
    k: int,
    device: torch.device | str,
    *,
    gating: Gating,
    kind: LayerKind = "tokens",
    valid: torch.Tensor | None = None,
    skip_first: bool = False,
    prior_count: torch.Tensor | None = None,
    starts: bool = True,
    rows: torch.Tensor | None = None,
) -> Positions:
    """The shared part of the gate for a call of B rows and K positions (see `gate_lambdas`)."""
    vf = None if valid is None else valid.to(device=device, dtype=torch.float32).unsqueeze(-1)
    if vf is None:
        count = torch.full((b, 1, 1), float(k), device=device) if prior_count is None else prior_count + k
    else:
        n = vf if k == 1 else vf.sum(1, keepdim=True)
        count = n if prior_count is None else prior_count + n
    divisor = count.clamp_min(1)
    step = None
    if k == 1 and prior_count is not None:  # mean' = mean + valid / count * (logit - mean)
        step = divisor.reciprocal() if vf is None else vf / divisor
    masks = starts and (skip_first or valid is not None)
    causal = gating == "causal" and kind != "spatial"
    seen = drop = None
    if (causal and step is None) or masks:
        if k == 1:
            seen = count
        else:
            seen = (torch.ones(b, k, 1, device=device) if vf is None else vf).cumsum(1)
            if prior_count is not None:
                seen = seen + prior_count
    if masks:
        drop = seen == 0  # left padding before any real token
        if skip_first:  # the first real token of the sequence, if it is in this call
            drop = drop | ((seen == 1) if vf is None else (seen == 1) & (vf > 0))
    pad = None
    if valid is not None and gating == "token":
        pad = ~valid.to(device=device, dtype=torch.bool).unsqueeze(-1)
    if rows is not None:
        rows = rows.to(device=device, dtype=torch.float32).view(b, 1, 1)
    seen = seen.clamp_min(1) if causal and seen is not None else None
    return Positions(vf, prior_count, count, divisor, step, seen, drop, pad, rows)


def layer_lambdas(
    proj: torch.Tensor,
    pos: Positions,
    *,
    gating: Gating,
    kind: LayerKind = "tokens",
    floor: float = 0.0,
    prior_mean: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State]:
    """One layer's lambdas (B, K, 1) from its gate logits `proj` (B, K, 1) (bias included), and its new state.

    The state is the running mean of the logits, not their sum: the pooled and causal logits are
    that mean already, so keeping it costs nothing, and a cached token moves it in one lerp.
    """
    k = proj.shape[1]
    token = gating == "token"
    if pos.step is not None and prior_mean is not None:  # a cached decoding step
        mean = torch.lerp(prior_mean, proj, pos.step)
        logits = mean if not token else proj if pos.pad is None else torch.where(pos.pad, mean, proj)
    else:
        pv = proj if pos.valid is None else proj * pos.valid
        if gating == "causal" and kind != "spatial":
            run = pv if k == 1 else pv.cumsum(1)
            if prior_mean is not None:
                run = torch.addcmul(run, prior_mean, pos.prior)
            logits = run / pos.seen
            mean = logits[:, -1:]  # the causal mean at the last position is the mean of all so far
        else:
            total = pv if k == 1 else pv.sum(1, keepdim=True)
            if prior_mean is not None:
                total = torch.addcmul(total, prior_mean, pos.prior)
            mean = total / pos.divisor
            # images cannot be read causally: their mean decides, one sigmoid per row broadcast at the end
            logits = mean if not token else proj if pos.pad is None else torch.where(pos.pad, mean, proj)
    lam = torch.sigmoid(logits)
    if floor > 0:
        lam = lam.masked_fill(lam < floor, 0.0)
    if pos.drop is not None:
        lam = lam.masked_fill(pos.drop, 0.0)
    if pos.rows is not None:
        lam = lam * pos.rows
    if lam.shape[1] != k:
        lam = lam.expand(-1, k, -1)
    return lam, (mean, pos.count)


def gate_lambdas(
    proj: torch.Tensor,
    *,
    gating: Gating,
    kind: LayerKind = "tokens",
    valid: torch.Tensor | None = None,
    skip_first: bool = False,
    floor: float = 0.0,
    prior: State | None = None,
    starts: bool = True,
) -> tuple[torch.Tensor, State]:
    """Lambdas (B, K) from gate logits `proj` (B, K) (bias included), and the updated running state.

    `prior` is the running state returned for earlier calls of the same sequence (KV cache);
    `valid` marks real tokens. Padding positions take the sequence decision in `token` mode; the
    first real token of a sequence is not steered if `skip_first`. `starts=False` says the call
    continues a sequence already under way (a cached decoding step): no first token or leading
    padding can be in it, which saves their masks on the hot path.
    """
    proj = proj.float().unsqueeze(-1)
    pos = positions(proj.shape[0], proj.shape[1], proj.device, gating=gating, kind=kind, valid=valid,
                    skip_first=skip_first, prior_count=None if prior is None else prior[1], starts=starts)
    lam, state = layer_lambdas(proj, pos, gating=gating, kind=kind, floor=floor,
                               prior_mean=None if prior is None else prior[0])
    return lam.squeeze(-1), state


class _LayerRuntime:
    """One layer's map and gate, cast lazily to the device and dtype of its activations."""

    def __init__(self, map_: SteeringMap, gate: Gate, kind: LayerKind, steered: bool):
        self.map, self.gate, self.kind, self.steered = map_, gate, kind, steered
        self.width = map_.width
        self._cast: dict = {}
        self._last: tuple | None = None

    def on(self, x: torch.Tensor) -> tuple[SteeringMap, torch.Tensor, torch.Tensor]:
        last = self._last
        if last is not None and last[0] is x.dtype and last[1] == x.device:  # the hot path: as last call
            return last[2]
        key = (x.device, x.dtype)
        if key not in self._cast:
            self._cast[key] = (self.map.to(x.device, x.dtype), self.gate.weight.to(x.device, x.dtype).view(1, -1),
                               self.gate.bias.to(x.device, x.dtype).view(1))
        self._last = (x.dtype, x.device, self._cast[key])
        return self._cast[key]


class SteeringHandle(RunOptionAttributes, HookSet):
    """A Steering attached to one model. Use as a context manager or call `detach()`.

    `strength` (alpha) and `gated` can be changed between calls (strength 0: every hook returns at
    once; gated: layers whose gate failed the accuracy threshold are skipped, otherwise every
    hooked layer gets lambda = 1); `local_options` changes them for one thread's calls only.
    `scales` holds the lambdas recorded so far; `reset()` clears them and any KV-cache running
    state for a new generation.

    One handle may serve several threads at once: masks, batch rows, running gate state and
    recorded lambdas are kept per thread (`SteeringCall`), so `scales`, `history` and `reset()`
    are about the calling thread's own calls.
    """

    def __init__(
        self,
        steering: "Steering",
        root: torch.nn.Module,
        names: dict[str, str],
        *,
        strength: float = 1.0,
        gated: bool = True,
        gating: Gating | None = None,
        lambda_floor: float | None = None,
        skip_first_token: bool | None = None,
        record_scales: bool = True,
        pre_forward: PreForward | None = None,
        what: str = "model",
    ):
        cfg = steering.config
        # checked once here; later assignments (handle.strength = x) are checked by RunOptionAttributes
        self.options = RunOptions.from_config(cfg, strength=strength, gated=gated, gating=gating,
                                              lambda_floor=lambda_floor, skip_first_token=skip_first_token,
                                              record_scales=record_scales)
        super().__init__(root, list(names.values()), pre_forward, what)
        self.track_running = False  # set by integrations whose calls continue a sequence (KV cache)
        self.layer_names = {local: full for full, local in names.items()}
        self._layers = {
            local: _LayerRuntime(steering.maps[full], steering.gates[full], cfg.layers[full].kind, cfg.layers[full].steered)
            for full, local in names.items()
        }
        self._attach()

    def detach(self):
        self.remove()

    def reset(self):
        """Forget this thread's recorded lambdas, running state, masks and batch rows (other threads keep theirs)."""
        call = self._local.call
        call.clear()
        call.valid = None
        call.rows = None

    def _new_call_state(self) -> SteeringCall:
        return SteeringCall()

    # this thread's state, under the names integrations and tests have always used
    @property
    def running(self) -> dict[str, State]:
        return self._local.call.running

    @property
    def history(self) -> dict[str, list]:
        return self._local.call.history

    @property
    def continuing(self) -> bool:
        return self._local.call.continuing

    @continuing.setter
    def continuing(self, value: bool) -> None:
        self._local.call.continuing = value

    @property
    def scales(self) -> dict[str, torch.Tensor]:
        """The lambdas recorded by this thread's calls (after a call: that call's), per layer: (B, tokens)
        for token layers (calls joined along tokens, as a cached generation produces them; rows
        follow the KV cache when beam search reorders it), (calls, B, positions) for spatial layers."""
        return {self.layer_names[local]: joined(chunks, self._layers[local].kind == "spatial")
                for local, chunks in self._local.call.history.items()}

    @contextmanager
    def local_options(self, *, strength: float | None = None, gated: bool | None = None,
                      record_scales: bool | None = None) -> Iterator["SteeringHandle"]:
        """Run this thread's calls inside the block with these options (None: as they are), leaving the
        handle, and every other thread's calls through it, as they were. A pipeline keeps its hooks
        at strength 0 and switches them on this way for its own call only."""
        call = self._local.call
        saved = call.overrides
        base = saved if saved is not None else (self.strength, self.gated, self.record_scales)
        call.overrides = (base[0] if strength is None else check_strength(strength, "strength"),
                          base[1] if gated is None else check_bool(gated, "gated"),
                          base[2] if record_scales is None else check_bool(record_scales, "record_scales"))
        try:
            yield self
        finally:
            call.overrides = saved

    def sequence_call(self, past: int, new: int | None) -> SteeringCall:
        """Called by a causal-LM `pre_forward` before each forward of `new` tokens after `past` cached
        ones: the call continues this thread's sequence (KV cache) or, without a past, starts a new
        one, which clears the state of the last one. A past that is not the length this thread's
        sequence has reached belongs to another cache (a reused prompt cache, two sequences
        interleaved in one thread): its running state is not this one, so the call is refused."""
        self.track_running = True
        call = self._local.call
        continuing = past > 0
        call.continuing = continuing
        if not continuing:
            call.clear()
        elif call.sequence is not None and call.sequence.refused is not None:
            raise ValueError(call.sequence.refused)
        if torch.compiler.is_compiling():  # an int that changes every step would be a guard: not checked there
            call.length = None
            return call
        if continuing and call.length is not None and past != call.length:
            raise ValueError(
                f"this forward continues a cached sequence of {past} tokens, but the steering's running gate "
                f"state in this thread is that of a sequence of {call.length} tokens: it belongs to another KV cache "
                "(a reused prompt cache, or two cached sequences interleaved in one thread). One thread steers one "
                "cached sequence at a time: run each sequence from its prompt, or each in a thread of its own")
        call.length = None if new is None else past + new
        return call

    def new_sequence(self, call: SteeringCall, cache) -> Sequence:
        """`call`'s sequence from now on, following `cache` (see `core.sequence.follow_cache`)."""
        call.sequence = Sequence(call, self.gating, cache)
        return call.sequence

    def _begin_call(self, args, kwargs):
        self._local.call.positions.clear()
        super()._begin_call(args, kwargs)

    def _positions(self, call: SteeringCall, kind: LayerKind, tokens: torch.Tensor, prior: State | None) -> Positions:
        """This call's `Positions`, computed by the first layer that needs them and shared by the rest."""
        b, k = tokens.shape[:2]
        prior_count = None if prior is None else prior[1]
        key = (kind, b, k, id(prior_count))  # one call runs on one device
        hit = call.positions.get(key)
        # the entry holds the tensors it was computed from, so their ids cannot be reused while it lives
        if hit is not None and hit[0] is call.valid and hit[1] is call.rows and hit[2] is prior_count:
            return hit[3]
        pos = positions(b, k, tokens.device, gating=self._gating, kind=kind, valid=call.valid,
                        skip_first=self._skip_first_token, prior_count=prior_count,
                        starts=not (self.track_running and call.continuing), rows=call.rows)
        call.positions[key] = (call.valid, call.rows, prior_count, pos)
        return pos

    def _on_output(self, name, x):
        call = self._local.call  # the state of the thread running this forward
        layer = self._layers[name]
        overrides = call.overrides
        strength, gated, record = (self._strength, self._gated, self._record_scales) if overrides is None else overrides
        if strength == 0 or (gated and not layer.steered):
            return None
        tokens, restore = (x, None) if x.dim() == 3 else as_tokens(x)
        if tokens.shape[-1] != layer.width:
            raise ValueError(
                f"layer {self.layer_names[name]!r} produces activations of width {tokens.shape[-1]}, but the steering "
                f"was fitted on width {layer.width}: it belongs to another model; fit it again on this one"
            )
        map_, weight, bias = layer.on(tokens)
        if gated:
            prior = call.running.get(name) if self.track_running else None
            pos = self._positions(call, layer.kind, tokens, prior)
            proj = F.linear(tokens, weight, bias)  # (B, K, 1); in half precision the bias is rounded too
            if proj.dtype is not torch.float32:
                proj = proj.float()
            lam, state = layer_lambdas(proj, pos, gating=self._gating, kind=layer.kind,
                                       floor=self._lambda_floor, prior_mean=None if prior is None else prior[0])
            if self.track_running:
                call.running[name] = state
                call.undo[name] = (prior, proj)  # to go back if the KV cache is cropped
        else:  # plain steering: lambda = 1 everywhere
            lam = tokens.new_ones((*tokens.shape[:2], 1), dtype=torch.float32)
            if call.rows is not None:
                lam = lam * call.rows.to(lam.device, lam.dtype).view(-1, 1, 1)
        if record:  # (B, K, 1): `scales` drops the last axis when it is read, not here
            call.history[name].append(lam.detach() if lam.requires_grad else lam)
        scale = lam if lam.dtype == tokens.dtype else lam.to(tokens.dtype)
        out = torch.addcmul(tokens, scale, map_.delta(tokens), value=strength)
        return out if restore is None else restore(out)

