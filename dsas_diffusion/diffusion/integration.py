"""`apply_dsas(pipe, steering)` / `remove_dsas(pipe)`: DSAS on any supported stock diffusers pipeline
through forward hooks on its text encoders and denoiser (the named DSAS pipelines use the same path
through `set_steering`).

The hooks steer the positive branch of classifier-free guidance only (unless `steer_negative`).
Every supported pipeline's `__call__` runs `check_inputs` first, then `encode_prompt` (FLUX encodes
its negative prompt in a second `encode_prompt`), then the denoiser, and ends with
`maybe_free_model_hooks`. `apply_dsas` wraps those three methods on the pipeline object (instance
attributes, removed again by `remove_dsas`) to follow a call per thread: `encode_prompt` runs as two
stock calls, the positive prompts (steered) and then the negative ones (steering off: untouched, bit
for bit), and the rows of the [negative; positive] denoiser batch to steer are set once per call.
Outside a pipeline call, a component on its own is steered as applied, like a module with a LoRA
loaded.
"""

from __future__ import annotations

import inspect
import math
import os
import threading
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Iterator

import torch

from ..core import Steering, SteeringHandle
from ..core.options import check_bool, check_strength
from .families import Family, denoiser_input, family_of
from .padding import eos_token_id, padding_mask

_ATTR = "_dsas_integration"  # the pipeline's integration while a steering is applied to it
_WRAPPED = ("check_inputs", "encode_prompt", "maybe_free_model_hooks")
_ABSENT = object()


@dataclass
class _Call:
    """One pipeline call in one thread."""

    encodings: int = 0  # encode_prompt invocations so far
    negative: torch.Tensor | None = None  # `separate` guidance: the prompt embeddings of the negative branch
    positive: torch.Tensor | None = None  # ... and of the positive one
    same_seen: int = 0  # denoiser forwards so far whose two branches' embeddings are one tensor


@dataclass
class _Layout:
    """How a thread's last call laid out its denoiser batch, to read its lambdas."""

    halves: bool = False  # a [negative; positive] batch: the lambdas of the positive half are the ones shown
    grid: tuple[int, int] | None = None  # (H', W') of its latents


class PipelineSteering:
    """A Steering applied to one pipeline (what `apply_dsas` returns).

    `strength` and `gated` can be changed between calls; `scales` holds the lambdas of this thread's
    last call: text encoder layers (prompts, tokens), denoiser layers (steps, images, H', W') over
    the positive branch; `remove()` is `remove_dsas(pipe, this)`."""

    def __init__(self, integration: "_Integration", steering: Steering, handles: dict[str, SteeringHandle],
                 steer_negative: bool):
        self.steering, self.handles = steering, handles
        self._integration = integration
        self.on_remove: list = []  # called once it is removed (a named pipeline forgets its set steering)
        self._steer_negative = steer_negative
        self._local = threading.local()  # `steer_negative` set by local_options for this thread

    @property
    def pipeline(self):
        return self._integration.pipeline

    @property
    def strength(self) -> float:
        return next(iter(self.handles.values())).strength

    @strength.setter
    def strength(self, value: float) -> None:
        value = check_strength(value, "strength")
        for handle in self.handles.values():
            handle.strength = value

    @property
    def gated(self) -> bool:
        return next(iter(self.handles.values())).gated

    @gated.setter
    def gated(self, value: bool) -> None:
        value = check_bool(value, "gated")
        for handle in self.handles.values():
            handle.gated = value

    @property
    def steer_negative(self) -> bool:
        """Whether the negative branch is steered too, in this thread (see `local_options`)."""
        local = getattr(self._local, "steer_negative", None)
        return self._steer_negative if local is None else local

    @steer_negative.setter
    def steer_negative(self, value: bool) -> None:
        self._steer_negative = check_bool(value, "steer_negative")

    @contextmanager
    def local_options(self, *, strength: float | None = None, gated: bool | None = None,
                      record_scales: bool | None = None, steer_negative: bool | None = None
                      ) -> Iterator["PipelineSteering"]:
        """These options for this thread's calls inside the block only (None: as they are)."""
        if steer_negative is not None:
            check_bool(steer_negative, "steer_negative")
        saved = getattr(self._local, "steer_negative", None)
        with ExitStack() as stack:
            for handle in self.handles.values():
                stack.enter_context(handle.local_options(strength=strength, gated=gated, record_scales=record_scales))
            self._local.steer_negative = saved if steer_negative is None else steer_negative
            try:
                yield self
            finally:
                self._local.steer_negative = saved

    @property
    def scales(self) -> dict[str, torch.Tensor]:
        layout = self._integration.layout
        out = {}
        for component, handle in self.handles.items():
            for name, lam in handle.scales.items():
                lam = lam.float().cpu()
                if component == self._integration.family.denoiser:  # (steps, rows, positions)
                    if layout.halves:
                        lam = lam[:, lam.shape[1] // 2:]
                    if layout.grid is not None:
                        lam = as_image_grid(lam, *layout.grid)
                out[name] = lam
        return out

    def reset(self) -> None:
        for handle in self.handles.values():
            handle.reset()

    def remove(self) -> None:
        pipe = self.pipeline
        if pipe is not None:
            remove_dsas(pipe, self)

    def __repr__(self):
        return (f"PipelineSteering({self.steering!r} on {type(self.pipeline).__name__}, "
                f"components={list(self.handles)}, strength={self.strength})")


class _Integration:
    """What apply_dsas installs on one pipeline: the per-call bookkeeping its steerings share.

    Every decision is taken outside the steered modules, once per encoding or per call (which rows
    of the denoiser batch are positive, which text-encoder calls encode the negative prompt), so a
    compiled component sees the same Python state at every forward and is not recompiled. The
    exceptions are denoiser forwards outside the CFG batch: the negative branch of a `separate`
    guidance family (FLUX's true CFG), a call of its own, and a family's extra positive-only forwards
    (SD3's skip-layer guidance): a pre-hook / hook pair on the denoiser handles those."""

    def __init__(self, pipe, family: Family):
        self.family = family
        self._pipe = weakref.ref(pipe)
        self.applied: list[PipelineSteering] = []
        self._local = threading.local()  # `call` (under way), `layout` (of the last call), `entered` (open forwards)
        stock = next(c for c in type(pipe).__mro__ if c.__name__ == family.pipeline)
        self._signatures = {name: inspect.signature(getattr(stock, name)) for name in ("check_inputs", "encode_prompt")}
        self._saved: dict[str, object] = {}
        self._hooks: list = []
        self.captures: list = []  # fitting's ActivationCaptures on the denoiser: they record the positive branch

    @property
    def pipeline(self):
        return self._pipe()

    @property
    def call(self) -> _Call | None:
        return getattr(self._local, "call", None)

    @property
    def layout(self) -> _Layout:
        return getattr(self._local, "layout", None) or _Layout()

    # ---- installing -------------------------------------------------------------------------------
    def install(self, pipe) -> None:
        for name in _WRAPPED:
            self._saved[name] = pipe.__dict__.get(name, _ABSENT)
            setattr(pipe, name, getattr(self, f"_{name}")(getattr(pipe, name)))
        denoiser = getattr(pipe, self.family.denoiser, None)
        if (self.family.guidance == "separate" or self.family.extra_forward) and denoiser is not None:
            self._hooks.append(denoiser.register_forward_pre_hook(self._other_forward, with_kwargs=True))
            self._hooks.append(denoiser.register_forward_hook(self._branch_done, always_call=True))
        setattr(pipe, _ATTR, self)

    def uninstall(self, pipe) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for name, saved in self._saved.items():
            if saved is _ABSENT:
                pipe.__dict__.pop(name, None)
            else:
                setattr(pipe, name, saved)
        pipe.__dict__.pop(_ATTR, None)

    def _arguments(self, method: str, args, kwargs) -> dict | None:
        """The call's arguments by name, defaults included; None when the stock method would refuse them."""
        try:
            bound = self._signatures[method].bind(None, *args, **kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.pop("self")
        for name, param in self._signatures[method].parameters.items():
            if param.kind is param.VAR_KEYWORD:
                arguments.update(arguments.pop(name, {}))
        return arguments

    # ---- following a call -------------------------------------------------------------------------
    def _check_inputs(self, original):
        def check_inputs(*args, **kwargs):
            self._local.call = _Call()  # a pipeline call begins: the lambdas of the last one go
            arguments = self._arguments("check_inputs", args, kwargs) or {}
            height, width, factor = arguments.get("height"), arguments.get("width"), self.pipeline.vae_scale_factor
            grid = (height // factor, width // factor) if height and width else None
            self._local.layout = _Layout(grid=grid)
            for applied in self.applied:
                applied.reset()
            return original(*args, **kwargs)
        return check_inputs

    def _maybe_free_model_hooks(self, original):
        def maybe_free_model_hooks(*args, **kwargs):
            self._local.call = None
            return original(*args, **kwargs)
        return maybe_free_model_hooks

    def _encode_prompt(self, original):
        def encode_prompt(*args, **kwargs):
            own = self.call is None  # called on its own, outside a pipeline call: a call of its own
            call = self._local.call = self.call or _Call()
            try:
                arguments = self._arguments("encode_prompt", args, kwargs)
                if arguments is None:  # the stock method refuses the call, with its own message
                    return original(*args, **kwargs)
                if self.family.guidance == "separate":  # FLUX: the second encoding is the negative prompt
                    negative = call.encodings > 0
                    call.encodings += 1
                    with self._text_encoders(positive=not negative):
                        result = original(**arguments)
                    if negative:
                        call.negative = result[0]
                    else:
                        call.positive = result[0]
                    return result
                result = self._encode_batched(original, arguments)
                cfg = bool(arguments.get("do_classifier_free_guidance"))
                self._rows_for_the_call(result[0].shape[0], cfg, result[0].device)
                return result
            finally:
                if own:
                    self._local.call = None
        return encode_prompt

    def _encode_batched(self, original, arguments: dict):
        """The stock encoding in two calls: the positive prompts alone, steered, then the stock call with
        those embeddings given, which encodes only the negative prompts and repeats the embeddings per
        image exactly as one call would (where it repeats given embeddings, the first call makes one per prompt)."""
        if arguments.get("prompt_embeds") is None:
            with self._text_encoders(positive=True):
                if arguments.get("do_classifier_free_guidance") is not True:
                    return original(**arguments)
                once = {"num_images_per_prompt": 1} if self.family.repeats_given_embeddings else {}
                first = original(**{**arguments, "do_classifier_free_guidance": False, **once})
            arguments = {**arguments, **{name: first[i] for name, i in self.family.positive_outputs.items()}}
        with self._text_encoders(positive=False):
            return original(**arguments)

    @contextmanager
    def _text_encoders(self, positive: bool):
        """The text encoders' steering as it should be for the prompts of one branch: off for the negative
        one (strength 0: untouched, bit for bit) unless steer_negative, and recorded for the positive one only."""
        with ExitStack() as stack:
            if not positive:
                for applied in self.applied:
                    for component, handle in applied.handles.items():
                        if component != self.family.denoiser:
                            stack.enter_context(handle.local_options(record_scales=False) if applied.steer_negative
                                                else handle.local_options(strength=0.0, record_scales=False))
            yield

    def _rows_for_the_call(self, n: int, cfg: bool, device) -> None:
        """A [negative; positive] denoiser batch of 2n rows: the steering and fitting's captures touch the
        positive half only, for every denoiser forward of this call."""
        self._local.layout = replace(self.layout, halves=cfg)
        halves = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)]).to(device) \
            if cfg else None
        for applied in self.applied:
            handle = applied.handles.get(self.family.denoiser)
            if handle is not None:
                handle.rows = None if applied.steer_negative else halves
        for capture in self.captures:
            capture.rows = halves

    def _other_forward(self, module, args, kwargs):
        """Before a denoiser forward outside the CFG batch: the negative branch of `separate` guidance
        (steering off unless steer_negative, not recorded), or an extra positive-only forward (every row
        steered, not recorded: its batch is not the call's)."""
        call = self.call
        negative = call is not None and call.negative is not None and \
            kwargs.get("encoder_hidden_states") is call.negative
        if negative and call.positive is call.negative:
            # one tensor given as both prompt_embeds and negative_prompt_embeds: told apart by order, as the
            # pipeline runs the positive branch first in each step
            negative = call.same_seen % 2 == 1
            call.same_seen += 1
        extra = self.family.extra_forward is not None and kwargs.get(self.family.extra_forward) is not None
        stack = ExitStack()
        if negative or extra:
            x = denoiser_input(args, kwargs)
            for capture in self.captures:
                stack.callback(setattr, capture, "rows", capture.rows)
                capture.rows = torch.zeros(x.shape[0], dtype=torch.bool)
            for applied in self.applied:
                handle = applied.handles.get(self.family.denoiser)
                if handle is None:
                    continue
                stack.callback(setattr, handle, "rows", handle.rows)
                handle.rows = None
                off = negative and not applied.steer_negative
                stack.enter_context(handle.local_options(strength=0.0, record_scales=False) if off
                                    else handle.local_options(record_scales=False))
        self._local.__dict__.setdefault("entered", []).append(stack)

    def _branch_done(self, module, args, output):
        entered = self._local.__dict__.get("entered")
        if entered:
            entered.pop().close()


@contextmanager
def following_calls(pipe, capture=None):
    """The pipeline's calls followed (as when a steering is applied) inside the block; `capture`, an
    ActivationCapture on the denoiser, then records the positive branch of each denoiser forward only."""
    integration = getattr(pipe, _ATTR, None)
    own = integration is None
    if own:
        integration = _Integration(pipe, family_of(pipe))
        integration.install(pipe)
    if capture is not None:
        integration.captures.append(capture)
    try:
        yield integration
    finally:
        if capture is not None:
            integration.captures.remove(capture)
        if own and not integration.applied and not integration.captures:
            integration.uninstall(pipe)


def applied_to(pipe) -> list[PipelineSteering]:
    """The steerings applied to `pipe` (by apply_dsas, or set on a named pipeline), in the order applied."""
    integration = getattr(pipe, _ATTR, None)
    return list(integration.applied) if integration is not None else []


# ---- the public functions -------------------------------------------------------------------------
def apply_dsas(pipe, steering: Steering | str | os.PathLike, strength: float = 1.0, *, gated: bool = True,
               steer_negative: bool = False, check_model: bool = True) -> PipelineSteering:
    """Steer `pipe` (a stock diffusers pipeline of a supported family) with `steering` (or a saved
    steering folder) at global strength `strength` (alpha), until `remove_dsas(pipe)`. A named DSAS
    pipeline is refused: its calls switch its own steering, set with `set_steering`.

    gated: False applies plain steering (lambda = 1 at every fitted layer), for comparisons.
    steer_negative: also steer the negative branch of classifier-free guidance.
    check_model: refuse a steering fitted on other weights (the fingerprint of each component).

    Apply before `torch.compile`: a compiled module ignores hooks added afterwards. One steering per
    pipeline: remove the one applied before."""
    if getattr(pipe, "_dsas_named", False):
        raise ValueError(
            f"{type(pipe).__name__} is a DSAS pipeline: its own calls switch its steering on and off "
            "(steering_strength=0 runs it untouched), which a steering applied with apply_dsas would escape. Use "
            "pipe.set_steering(steering) and the call's steering_strength= / gated= / steer_negative=, or apply_dsas "
            "on the stock pipeline class")
    integration = getattr(pipe, _ATTR, None)
    if integration is not None and integration.applied:
        raise ValueError(f"a steering is already applied to this pipeline ({integration.applied[0].steering!r}); "
                         "applying a second one would steer its layers twice: call remove_dsas(pipe) first")
    return attach_to_pipeline(pipe, steering, strength, gated=gated, steer_negative=steer_negative,
                              check_model=check_model)


def remove_dsas(pipe, applied: PipelineSteering | None = None) -> None:
    """Remove `applied` (default: every steering applied to `pipe`) and, with the last one, every
    hook and wrapped method: the pipeline is then exactly as if nothing had been applied."""
    if not hasattr(pipe, "components"):
        raise TypeError(f"remove_dsas takes the diffusers pipeline a steering was applied to, got {type(pipe).__name__}")
    integration = getattr(pipe, _ATTR, None)
    if integration is None:
        if applied is None:
            return
        raise ValueError("this steering is not applied to this pipeline (it was removed already)")
    if applied is not None and applied not in integration.applied:
        raise ValueError("this steering is not applied to this pipeline (it was removed already, or belongs to "
                         "another one)")
    for one in [applied] if applied is not None else list(integration.applied):
        for handle in one.handles.values():
            handle.detach()
        integration.applied.remove(one)
        for callback in one.on_remove:
            callback(one)
    if not integration.applied and not integration.captures:
        integration.uninstall(pipe)


def attach_to_pipeline(pipe, steering, strength: float = 1.0, *, gated: bool = True, steer_negative: bool = False,
                       check_model: bool = True) -> PipelineSteering:
    """`apply_dsas` without the one-steering rule: a named pipeline keeps the steering set with
    `set_steering` at strength 0 outside its calls, and attaches a per-call steering next to it."""
    family = family_of(pipe)
    if isinstance(steering, (str, os.PathLike)):
        steering = Steering.from_pretrained(steering)
    if not isinstance(steering, Steering):
        raise TypeError(f"steering must be a Steering or the path of a saved steering folder, got "
                        f"{type(steering).__name__}: fit one with pipe.fit_steering or "
                        "dsas_diffusion.fit_pipeline_steering, or load one with Steering.from_pretrained(path)")
    strength = check_strength(strength, "strength")
    for name, value in (("gated", gated), ("steer_negative", steer_negative), ("check_model", check_model)):
        check_bool(value, name)
    check_steering(pipe, family, steering, check_model)
    integration = getattr(pipe, _ATTR, None) or _Integration(pipe, family)
    handles: dict[str, SteeringHandle] = {}
    try:
        for component in family.components:
            if not any(n.startswith(f"{component}.") for n in steering.layers):
                continue
            module = getattr(pipe, component)
            pre_forward = None
            if component != family.denoiser:
                pre_forward = padding_mask(eos_token_id(getattr(pipe, family.tokenizer_of(component), None), module))
            # owner: the integration switches its attachments on and off per call and branch, so the ones of
            # a named pipeline (its set steering and a per-call one) may share modules; anyone else's may not.
            # Each layer's steered output element (the image stream of a joint block) is in the steering.
            # skip_first_token skips a BOS; a T5 prompt's first token is a word, a DiT's first an image patch
            skip_first = family.skip_first_token(component, steering.config.skip_first_token)
            handles[component] = steering.attach(module, strength, prefix=f"{component}.", layers=steering.layers,
                                                 gated=gated, check_model=False, owner=integration,
                                                 pre_forward=pre_forward, skip_first_token=skip_first)
    except BaseException:
        for handle in handles.values():
            handle.detach()
        raise
    applied = PipelineSteering(integration, steering, handles, steer_negative)
    if getattr(pipe, _ATTR, None) is not integration:
        integration.install(pipe)
    integration.applied.append(applied)
    return applied


def check_steering(pipe, family: Family, steering: Steering, check_model: bool) -> None:
    """Refuse a steering for layers this pipeline does not have, or fitted on other weights."""
    roots = {n.split(".", 1)[0] for n in steering.layers}
    foreign = sorted(roots - set(family.components))
    if foreign:
        layer = next(n for n in steering.layers if n.split(".", 1)[0] == foreign[0])
        raise ValueError(
            f"this steering targets layers outside the text encoders and {family.denoiser} of this {family.name} "
            f"pipeline ({layer!r} ...); it was fitted on another kind of model (a language model?) or another "
            "pipeline family: fit one on this pipeline with `pipe.fit_steering` or `fit_pipeline_steering`")
    for component in sorted(roots):
        if getattr(pipe, component, None) is None:
            raise ValueError(f"this steering has layers in the {component}, but this pipeline has no {component} "
                             f"(it was loaded with {component}=None); load the pipeline with it")
        if check_model:
            steering.check_model(getattr(pipe, component), component, component)


def as_image_grid(lam: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(steps, rows, positions) -> (steps, rows, H, W) at the layer's own resolution, from the
    latent grid (h, w): UNet layers are downsampled by powers of 2, DiT tokens by the patch size."""
    positions = lam.shape[-1]
    factor = round(math.sqrt(h * w / positions))
    for hh, ww in ((h // factor, w // factor), (math.ceil(h / factor), math.ceil(w / factor))):
        if hh * ww == positions:
            return lam.reshape(*lam.shape[:-1], hh, ww)
    return lam
