"""Applying a fitted Steering: the DSAS rule x' = x + alpha * lambda * (T(x) - x) in forward hooks.

Per position the gate costs one dot product: the logit of a mean of activations is the mean of
the per-position logits (the gate is linear before the sigmoid), so the pooled modes only pool
the scalar projections, and a KV-cached token updates a running (mean, count) per row in O(1).

What depends only on the positions of a call (real tokens, running counts, the masks of the first
token and of leading padding) is the same for every hooked layer, so it is computed once per
forward call (`positions`) and each layer pays only its own op (`fused.steer_layer`: one Triton
kernel on CUDA; on a CPU a dot product, a lerp, a sigmoid and one addcmul on a cached decoding
step). No host-device synchronisation and no Python loop over positions happen on this path.

Under torch.compile nothing on this path is a guard that changes between calls or steps: the
strength is a tensor (`_Run`), recorded lambdas leave the graph through one op (`recorder`), the
per-call cache holds no tensor identities, and the running state keeps one layout.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

from .call_state import Sequence, SteeringCall, State, joined
from .config import Gating, LayerKind
from .fused import MapTerms, gate_logits, lambdas, map_terms, steer_layer
from .gate import Gate
from .hooks import steered_positions
from .hooks import HookSet, PreForward, as_tokens, masked_mean
from .maps import SteeringMap
from .options import RunOptionAttributes, RunOptions, check_bool, check_strength
from .recorder import Recorder

if TYPE_CHECKING:
    from .steering import Steering


@dataclass
class Positions:
    """Facts about one call's positions that every hooked layer shares.

    Tensors carry a trailing axis of 1, the shape of a per-position scale over (B, K, D)
    activations, so no layer pays for reshaping them.
    """

    valid: torch.Tensor | None  # (B, K, 1) bool, True for real tokens; None when every token is real
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
    skip_first = skip_first and kind != "spatial"  # an image's first position is a patch, not a BOS
    if skip_first and starts and prior_count is None:  # never steered, so not counted in the gate's means either
        valid = steered_positions(valid, b, k, device, True)
    vb = None if valid is None else valid.to(device=device, dtype=torch.bool).unsqueeze(-1)
    vf = None if vb is None else vb.float()
    if vf is None:
        # k as it is, not float(k): compiled, that would make the number of positions a constant of the graph (a
        # graph per prompt length where a call has no mask, as GPT-1's generate() without a KV cache)
        count = torch.full((b, 1, 1), k, dtype=torch.float32, device=device) if prior_count is None \
            else prior_count + k
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
        drop = seen == 0  # left padding, and the first real token when it is skipped (no longer counted)
    pad = None
    if vb is not None and gating == "token":
        pad = ~vb
    if rows is not None:
        rows = rows.to(device=device, dtype=torch.float32).view(b, 1, 1)
    seen = seen.clamp_min(1) if causal and seen is not None else None
    return Positions(vb, prior_count, count, divisor, step, seen, drop, pad, rows)


def layer_lambdas(
    proj: torch.Tensor,
    pos: Positions,
    *,
    gating: Gating,
    kind: LayerKind = "tokens",
    floor: float = 0.0,
    prior_mean: torch.Tensor | None = None,
    activation: str = "sigmoid",
) -> tuple[torch.Tensor, State]:
    """One layer's lambdas (B, K, 1) from its gate logits `proj` (B, K, 1) (bias included), and its new
    state (running mean of the logits, count): `fused.lambdas`, the composite the fused op follows."""
    lam, mean = lambdas(proj, pos, gating=gating, kind=kind, floor=floor, prior_mean=prior_mean,
                        activation=activation)
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
    activation: str = "sigmoid",
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
                               prior_mean=None if prior is None else prior[0], activation=activation)
    return lam.squeeze(-1), state


class _LayerRuntime:
    """One layer's map and gate, cast lazily to the device and dtype of its activations.

    `spatial_mean`: the map transports each row's mean over its positions and every position gets
    that row's shift (the config's `spatial_map`; only where it differs from the map applied per
    position: an affine, closed-form map on a spatial layer)."""

    def __init__(self, map_: SteeringMap, gate: Gate, kind: LayerKind, steered: bool, element: int,
                 recorder: Recorder, spatial_mean: bool = False):
        self.map, self.gate, self.kind, self.steered, self.element = map_, gate, kind, steered, element
        self.width = map_.width
        self.recorder = recorder
        terms = map_terms(map_)
        self.spatial_mean = (spatial_mean and kind == "spatial" and not map_.learned
                             and (terms is None or terms.slope is not None))
        self._cast: dict = {}
        self.slot: tuple | None = None  # (group, row) in the handle's `_Packs`; None: read per layer

    def on(self, x: torch.Tensor, compiling: bool, packs: "_Packs") -> tuple:
        """(map, gate weight (1, D), gate bias (1,), the map's fused form or None) for activations like `x`."""
        key = (x.device, x.dtype)
        if compiling:
            packed = packs.layer(self, key)
            if packed is not None:
                return packed
        hit = self._cast.get(key)
        if hit is not None:
            return hit
        cast = self.cast(*key)
        if not compiling:  # a cache filled while tracing would be a guard that fails next call
            self._cast[key] = cast
            packs.build(key)  # a (device, dtype) new to this handle: packed for a compiled graph too
        return cast

    def cast(self, device: torch.device, dtype: torch.dtype) -> tuple:
        """What `on` returns for activations on `device` in `dtype`, made anew."""
        # the gate in float32 whatever the model's dtype: in bfloat16 its logits would move lambdas by up to 0.16
        map_ = self.map.to(device, dtype)
        return (map_, self.gate.weight.to(device, torch.float32).view(1, -1),
                self.gate.bias.to(device, torch.float32).view(1), map_terms(map_))


class _Packs:
    """Every layer's gate and fused map terms for one (device, dtype) in a few tensors, for a compiled graph.

    Traced, each tensor a hook reads from a Python object is an input of the graph that Dynamo
    checks at every call: six per steered layer for a clamped Linear-AcT, more than the model's own
    inputs and KV cache [measured on a ~134M Llama, 12 layers steered: Dynamo's guard check took about
    1.5 ms per decoding step stock and 0.75 ms more steered]. Packed, layers of one width and map
    form share two tensors (gates (L, D + 1) in float32, terms (L, T, D) in the activations' dtype),
    which the graph slices. Filled eagerly (a pack built while tracing would not outlive the trace):
    at attachment for the devices and dtypes of the model's weights, before each forward for those
    of its first weight (a model moved after attaching), and at an eager layer's first call in any other.
    The values are those the layers cast for themselves, so a packed layer steers to the same bits."""

    def __init__(self, layers: dict[str, "_LayerRuntime"]):
        self._groups: dict[tuple, list[_LayerRuntime]] = {}
        for layer in layers.values():
            terms = map_terms(layer.map)
            if terms is None or layer.spatial_mean:  # steered with the map's own ops, read per layer
                continue
            form = (layer.width, terms.slope is not None, terms.lo is not None, terms.inside)
            group = self._groups.setdefault(form, [])
            layer.slot = (form, len(group))
            group.append(layer)
        self._built: dict[tuple, dict[tuple, tuple[torch.Tensor, torch.Tensor]]] = {}

    def build(self, key: tuple) -> None:
        """Pack every group for (device, dtype) `key`, unless done already (never while tracing)."""
        if key in self._built or torch.compiler.is_compiling():
            return
        packs = {}
        for form, group in self._groups.items():
            cast = [layer.cast(*key) for layer in group]
            gates = torch.stack([torch.cat([w.view(-1), b.view(-1)]) for _, w, b, _ in cast])
            terms = torch.stack([torch.stack([t for t in c[3][:4] if t is not None]) for c in cast])
            packs[form] = (gates, terms)
        self._built[key] = packs

    def layer(self, layer: "_LayerRuntime", key: tuple) -> tuple | None:
        """`layer`'s (map, weight, bias, terms), sliced from its packs; None where it has none for `key`."""
        slot = layer.slot
        packs = self._built.get(key)
        if slot is None or packs is None:
            return None
        form, i = slot
        gates, terms = packs[form]
        width, affine, clamp, inside = form
        row = gates[i]
        t = terms[i]
        mapped = MapTerms(t[0], t[1] if affine else None, t[2] if clamp else None, t[3] if clamp else None, inside)
        return layer.map, row[:width].view(1, width), row[width:], mapped


class _Run:
    """The options a hook reads, in the form a compiled graph can take without specialising:
    `strength` is a 0-dim float32 tensor per device (a Python float would be a constant of the
    graph, one graph per value), updated in place; `active` (strength != 0) is the only thing
    about it a graph may branch on.

    A thread's calls read `call.run`: the handle's own `_Run` (one object, changed in place when an
    option is assigned) or, inside `local_options`, one of the thread's own. Always an object of
    this class, so a graph never branches on whether a thread has overrides."""

    __slots__ = ("active", "strength", "number", "gated", "record")

    def __init__(self, strength: float, gated: bool, record: bool, devices):
        self.strength = {d: torch.tensor(strength, dtype=torch.float32, device=d) for d in devices}
        self.set(strength, gated, record)

    def set(self, strength: float, gated: bool, record: bool) -> None:
        for t in self.strength.values():
            t.fill_(strength)
        # the value the tensors hold, for eager CPU hooks: reading it back (.item()) was an op per layer
        self.number = next(iter(self.strength.values())).item()
        self.active, self.gated, self.record = strength != 0, gated, record

    @property
    def value(self) -> float:
        return self.number

    def strength_on(self, device: torch.device) -> torch.Tensor:
        s = self.strength.get(device)
        if s is None:  # a device the model was not on when the options were set: made once
            s = next(iter(self.strength.values())).to(device)
            if not torch.compiler.is_compiling():
                self.strength[device] = s
        return s


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

    first = True  # before any other forward hook of a steered module (see HookSet.first)

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
        self._devices = _devices_of(root)
        self._activation = cfg.gate_activation
        # checked once here; later assignments (handle.strength = x) are checked by RunOptionAttributes
        self.options = RunOptions.from_config(cfg, strength=strength, gated=gated, gating=gating,
                                              lambda_floor=lambda_floor, skip_first_token=skip_first_token,
                                              record_scales=record_scales)
        super().__init__(root, list(names.values()), pre_forward, what)
        self.track_running = False  # set by integrations whose calls continue a sequence (KV cache)
        self.layer_names = {local: full for full, local in names.items()}
        self._layers = {
            local: _LayerRuntime(steering.maps[full].configured(cfg), steering.gates[full], cfg.layers[full].kind,
                                 cfg.layers[full].steered, getattr(cfg.layers[full], "element", 0),
                                 Recorder(self._history_of(local)), cfg.spatial_map == "spatial_mean")
            for full, local in names.items()
        }
        self.elements = {local: layer.element for local, layer in self._layers.items() if layer.element}
        self._packs = _Packs(self._layers)
        for key in _casts_of(root):
            self._packs.build(key)
        # `.to()` moves a module's parameters in place, so this one tells where the model is now; iterating
        # root.parameters() before every forward cost about 30 us
        self._first_weight = next((p for p in root.parameters() if p.is_floating_point()), None)
        self._attach()

    def _history_of(self, local: str):
        """Where a compiled graph's `dsas::record` puts this layer's lambdas when it runs: the list of
        the thread running it, or nowhere while that thread's calls are switched off."""
        def target():
            call = self._local.call
            return call.history[local] if call.run.active else None
        return target

    def _options_changed(self) -> None:
        """Keep the hooks' compiled-graph-friendly view of the options (`_Run`) in step with them."""
        if not hasattr(self, "_record_scales"):  # the first assignment sets them one by one
            return
        if hasattr(self, "_run"):
            self._run.set(self._strength, self._gated, self._record_scales)
        else:
            self._run = _Run(self._strength, self._gated, self._record_scales, self._devices)

    def detach(self):
        self.remove()

    def reset(self):
        """Forget this thread's recorded lambdas, running state, masks and batch rows (other threads keep theirs)."""
        call = self._local.call
        call.clear()
        call.valid = None
        call.rows = None

    def _new_call_state(self) -> SteeringCall:
        call = SteeringCall()
        call.run = self._run
        return call

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
        saved = call.run
        now = saved.value if strength is None else check_strength(strength, "strength")
        call.run = _Run(now, saved.gated if gated is None else check_bool(gated, "gated"),
                        saved.record if record_scales is None else check_bool(record_scales, "record_scales"),
                        self._devices)
        try:
            yield self
        finally:
            call.run = saved

    def sequence_call(self, past: int, new: int | None, carried: tuple | None = None) -> SteeringCall:
        """Called by a causal-LM `pre_forward` before each forward of `new` tokens after `past` cached
        ones: the call continues this thread's sequence (KV cache) or, without a past, starts a new
        one, which clears the state of the last one. `carried`, (tokens, running state), is the state a
        cache other than the one this thread follows carries for it (`Sequence.state`: a copy of a prompt's
        cache, or the cache of a sequence this thread left for another): a call continuing that many tokens
        continues from it. A past that is not the length this thread's sequence has reached otherwise belongs
        to a cache whose state is unknown, so the call is refused; at strength 0, which steers nothing, the
        state is dropped instead, as the stock model would not refuse."""
        self.track_running = True
        call = self._local.call
        call.tokens = new
        continuing = past > 0
        call.continuing = continuing
        if not continuing:
            call.clear()
        elif carried is not None and carried[0] == past:
            call.clear()
            call.running.update(carried[1])
            call.length = past
        elif call.sequence is not None and call.sequence.refused is not None and call.run.active:
            raise ValueError(call.sequence.refused)
        if torch.compiler.is_compiling():  # an int that changes every step would be a guard: not checked there
            call.length = None
            return call
        if continuing and call.length is not None and past != call.length and not call.run.active:
            call.clear()
        elif continuing and call.length is not None and past != call.length:
            raise ValueError(
                f"this forward continues a cached sequence of {past} tokens, but the steering's running gate "
                f"state in this thread is that of a sequence of {call.length} tokens, and this KV cache carries no "
                "state of its own for this steering: it was filled while the steering was not attached (or in "
                "another thread), or cropped while this thread ran another sequence. Run the sequence from its "
                "prompt with the steering attached (a cache filled that way, or a copy of it, continues its state)")
        call.length = None if new is None else past + new
        return call

    def new_sequence(self, call: SteeringCall, cache) -> Sequence:
        """`call`'s sequence from now on, following `cache` (see `dsas_diffusion.llm.sequence.follow_cache`)."""
        call.sequence = Sequence(call, self.gating, cache, skip_first=self._skip_first_token, owner=self)
        return call.sequence

    def _begin_call(self, args, kwargs):
        call = self._local.call
        call.positions.clear()
        call.pending.clear()  # left by a forward that failed half-way
        first = self._first_weight  # moved or cast since attaching (pipe.to("cuda")): pack for it too
        if first is not None and first.device.type != "meta":
            self._packs.build((first.device, first.dtype))
        super()._begin_call(args, kwargs)  # the pre_forward: a new sequence clears the running state
        call.before = dict(call.running)  # what a crop of this call's tokens goes back to (`Sequence.cropped`)
        call.undo.clear()

    def _end_call(self):
        """File the lambdas a compiled forward returned (`_on_output`), if this thread's calls were on."""
        call = self._local.call
        pending = call.pending
        if pending:
            if call.run.active:
                for name, lam in pending.items():
                    call.history[name].append(lam)
            pending.clear()

    def _positions(self, call: SteeringCall, kind: LayerKind, tokens: torch.Tensor, prior: State | None) -> Positions:
        """This call's `Positions`, computed by the first layer that needs them and shared by the rest.
        The cache is emptied when a call begins (and when the rows or length it depends on move). Its keys
        hold no tensor identity, which a compiled graph would have to guard on, and are compared, not hashed:
        hashing a dynamic size makes it a constant of the graph (one graph per prompt length and batch size)."""
        b, k = tokens.shape[:2]
        fresh = prior is None  # one call runs on one device
        for (kind_, b_, k_, fresh_), pos in call.positions:
            if kind_ == kind and fresh_ == fresh and b_ == b and k_ == k:
                return pos
        pos = positions(b, k, tokens.device, gating=self._gating, kind=kind, valid=call.valid,
                        skip_first=self._skip_first_token, prior_count=None if prior is None else prior[1],
                        starts=not (self.track_running and call.continuing), rows=call.rows)
        # traced too: without it each layer read its own running count, the same tensor, as an input of
        # its own (12 more graph inputs on a 12-layer Llama; its compiled call read about 50 us slower in one
        # comparison)
        call.positions.append(((kind, b, k, fresh), pos))
        return pos

    def _on_output(self, name, x):
        call = self._local.call  # the state of the thread running this forward
        layer = self._layers[name]
        run = call.run
        compiling = torch.compiler.is_compiling()
        # compiled, the graph steers and then chooses the result by the strength tensor (torch.where: bit-identical
        # to not steering at 0), so switching a call on and off (a pipeline's positive and negative prompts, a
        # language model's strength 0) does not make a graph of its own; a running state then moves at strength 0
        # too, as it does not eagerly (a crop it cannot follow then drops it rather than refusing: Sequence.cropped)
        select = compiling
        if not (select or run.active) or (run.gated and not layer.steered):
            return None
        tokens, restore = (x, None) if x.dim() == 3 else as_tokens(x)
        if tokens.shape[-1] != layer.width:
            raise ValueError(
                f"layer {self.layer_names[name]!r} produces activations of width {tokens.shape[-1]}, but the steering "
                f"was fitted on width {layer.width}: it belongs to another model; fit it again on this one"
            )
        map_, weight, bias, terms = layer.on(tokens, compiling, self._packs)
        if layer.spatial_mean:  # one shift per row, from its mean: the op's constant-shift form
            terms = MapTerms(_row_delta(map_, tokens, call.valid))
        # eager on the CPU the fused path takes the strength as a float: the same bits, one op less (steer_layer)
        number = not compiling and tokens.is_cpu
        strength = None if number else run.strength_on(tokens.device)
        out = None
        if run.gated:
            track = self.track_running
            prior = call.running.get(name) if track else None
            pos = self._positions(call, layer.kind, tokens, prior)
            prior_mean = None if prior is None else prior[0]
            if terms is not None:  # one op: gate, lambdas, map and blend (a Triton kernel on CUDA)
                out, lam, mean, proj = steer_layer(tokens, weight, bias, run.number if number else strength, terms,
                                                   pos, gating=self._gating,
                                                   kind=layer.kind, floor=self._lambda_floor, prior_mean=prior_mean,
                                                   activation=self._activation, state=track)
            else:
                proj = gate_logits(tokens, weight, bias)
                lam, mean = lambdas(proj, pos, gating=self._gating, kind=layer.kind, floor=self._lambda_floor,
                                    prior_mean=prior_mean, activation=self._activation, state=track)
            if track:
                call.running[name] = (mean, pos.count)
                # to go back if the KV cache is cropped (with `call.before`); a crop after a one-token call (a
                # decoding step) can only drop that token, which needs the state before it and not its logit
                if proj.shape[1] > 1:
                    call.undo[name] = proj
        else:  # plain steering: lambda = 1 everywhere
            lam = tokens.new_ones((*tokens.shape[:2], 1), dtype=torch.float32)
            if call.rows is not None:
                lam = lam * call.rows.to(lam.device, lam.dtype).view(-1, 1, 1)
        if run.record:  # (B, K, 1): `scales` drops the last axis when it is read, not here
            kept = lam.detach() if lam.requires_grad else lam
            if not compiling:
                call.history[name].append(kept)
            elif tokens.is_cuda:  # a graph must not touch the list (a guard on its length): the op appends at
                layer.recorder.record(kept)  # run time, a copy, which CUDA graphs cannot overwrite at their next replay
            else:  # an output of the graph, filed after the forward (`_end_call`); an op per layer cost more
                call.pending[name] = kept
        if out is None:
            if strength is None:
                strength = run.strength_on(tokens.device)
            scale = lam * strength
            out = torch.addcmul(tokens, scale if scale.dtype == tokens.dtype else scale.to(tokens.dtype),
                                terms.shift if layer.spatial_mean else map_.delta(tokens))
        if select:
            out = torch.where(strength != 0, out, tokens)
        return out if restore is None else restore(out)


def _row_delta(map_: SteeringMap, tokens: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(B, 1, D): the map's delta at each row's mean over its (real) positions; the mean is taken in
    float32 and the map evaluated in the activations' dtype, as at a single position."""
    if valid is not None:
        mean = masked_mean(tokens.float(), valid).unsqueeze(1)
    elif tokens.is_cpu and not torch.compiler.is_compiling():
        # what `mean` computes on a CPU (a sum, then a division by the count), called apart: inside a
        # denoiser about 54 us against 45 [measured in situ, reduced SDXL UNet, 352 calls each, alternating]
        mean = tokens.sum(1, keepdim=True, dtype=torch.float32).div_(tokens.shape[1])
    else:
        mean = tokens.mean(1, keepdim=True, dtype=torch.float32)
    return map_.delta(mean if mean.dtype == tokens.dtype else mean.to(tokens.dtype))


def _casts_of(root: torch.nn.Module) -> list[tuple[torch.device, torch.dtype]]:
    """The (device, dtype) pairs of the model's floating-point weights: what its activations will be."""
    return sorted({(p.device, p.dtype) for p in root.parameters() if p.is_floating_point() and p.device.type != "meta"},
                  key=str)


def _devices_of(root: torch.nn.Module) -> list[torch.device]:
    """Where the options' tensors are made up front: the CPU and the devices of the model's weights."""
    found = {torch.device("cpu")}
    for p in root.parameters():
        if p.device.type != "meta":
            found.add(p.device)
    return sorted(found, key=str)
