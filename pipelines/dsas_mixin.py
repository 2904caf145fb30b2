"""What every DSAS named pipeline adds to its stock diffusers class: `fit_steering`,
`set_steering`, the per-call `steering` / `steering_strength` / `gated` / `steer_negative`
arguments, and `steering_scales` on the output.

The steering runs through the same integration as `apply_dsas` on a stock pipeline: the steering
set with `set_steering` is applied at strength 0, and each call switches it on for the calling
thread only, so with no steering set, or `steering_strength=0`, the images are bit-identical to
the stock pipeline's, and so are those of another pipeline sharing the modules (`from_pipe`), even
while a steered call runs in another thread. The hooks exist before the user compiles a component,
which is what lets torch.compile trace them.
"""

from __future__ import annotations

import os
import threading
import weakref
from contextlib import ExitStack
from dataclasses import fields

import torch

from dsas_diffusion.core import Steering
from dsas_diffusion.core.options import check_bool, check_strength
from dsas_diffusion.diffusion.families import family_of
from dsas_diffusion.diffusion.fitting import fit_pipeline_steering
from dsas_diffusion.diffusion.integration import PipelineSteering, attach_to_pipeline, check_steering


class DSASPipelineMixin:
    r"""Mixed in before a stock pipeline class; `_output_class` is the stock output plus `steering_scales`."""

    _output_class: type
    _dsas_named = True  # apply_dsas refuses it: the steering of a DSAS pipeline goes through set_steering
    steering: Steering | None = None
    _dsas: PipelineSteering | None = None

    # 1. Fitting and setting a steering --------------------------------------------------------
    def fit_steering(self, source, target, control, method: str = "linear_act", **kwargs) -> Steering:
        """Fit maps (source -> target) and gates (source vs control) on this pipeline's text encoders
        and/or denoiser layers; see `dsas_diffusion.diffusion.fit_pipeline_steering`."""
        return fit_pipeline_steering(self, source, target, control, method, **kwargs)

    def set_steering(self, steering: Steering | str | os.PathLike | None, check_model: bool = True) -> None:
        """Use `steering` (or a saved steering folder) for later calls; None removes it and its hooks.

        Call it before `torch.compile`: compiled modules do not run hooks added afterwards."""
        if steering is not None and not isinstance(steering, (Steering, str, os.PathLike)):
            raise TypeError(f"steering must be a Steering, the path of a saved steering folder, or None (to remove "
                            f"it), got {type(steering).__name__}: fit one with pipe.fit_steering or load one with "
                            "Steering.from_pretrained(path)")
        check_bool(check_model, "check_model")
        if steering is not None and not isinstance(steering, Steering):
            steering = Steering.from_pretrained(steering)
        # the new hooks first: if they are refused, the steering set before stays in place
        new = attach_to_pipeline(self, steering, 0.0, check_model=check_model) if steering is not None else None
        if self._dsas is not None:
            try:
                self._dsas.remove()
            except BaseException:
                if new is not None:
                    new.remove()
                raise
        self._dsas, self.steering = new, steering
        if new is not None:  # removed with remove_dsas(pipe): forgotten, as set_steering(None) does
            pipe = weakref.ref(self)
            new.on_remove.append(lambda removed: _forget(pipe(), removed))

    # 2. Encoding: one thread at a time per tokenizer --------------------------------------------
    def encode_prompt(self, *args, **kwargs):
        with ExitStack() as turns:
            for name in sorted(n for _, n in family_of(self).text_encoders):
                turns.enter_context(_tokenizer_turn(getattr(self, name, None)))
            return super().encode_prompt(*args, **kwargs)

    # 3. Generating ----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, *args, steering: Steering | None = None, steering_strength: float = 1.0,
                 steer_negative: bool = False, gated: bool = True, return_steering_scales: bool = True, **kwargs):
        r"""Everything the stock pipeline's `__call__` takes, plus:

        steering: use this steering for this call instead of the one set with `set_steering`.
        steering_strength: the global strength alpha; 0 runs the stock pipeline untouched.
        steer_negative: also steer the negative branch of classifier-free guidance.
        gated: False applies plain steering (lambda = 1 at every fitted layer), for comparisons.
        return_steering_scales: record the lambdas (`output.steering_scales`): text encoder layers
        (prompts, tokens), denoiser layers (steps, prompts x images, H', W') over the positive branch.

        With `return_dict=False` the stock tuple is returned, without scales.
        """
        steering_strength = _check_call_options(steering, steering_strength, steer_negative, gated,
                                                return_steering_scales)
        steering = steering if steering is not None else self.steering
        if steering is None or steering_strength == 0:
            return self._output(super().__call__(*args, **kwargs), None)
        if steering is not self.steering:
            check_steering(self, family_of(self), steering, check_model=True)
        applied = self._dsas if steering is self.steering else attach_to_pipeline(self, steering, 0.0,
                                                                                  check_model=False)
        try:
            with applied.local_options(strength=steering_strength, gated=gated, record_scales=return_steering_scales,
                                       steer_negative=steer_negative):
                output = super().__call__(*args, **kwargs)
                scales = applied.scales if return_steering_scales else None
        finally:
            applied.reset()
            if applied is not self._dsas:
                applied.remove()
        return self._output(output, scales)

    def _output(self, output, scales):
        stock = self._output_class.__mro__[1]
        if not isinstance(output, stock):
            return output
        return self._output_class(**{f.name: getattr(output, f.name) for f in fields(stock)}, steering_scales=scales)


def _forget(pipe, removed: PipelineSteering) -> None:
    if pipe is not None and pipe._dsas is removed:
        pipe._dsas = pipe.steering = None


def _check_call_options(steering, steering_strength, steer_negative, gated, return_steering_scales) -> float:
    """The DSAS arguments of a call, checked before anything is encoded; returns the strength as a float."""
    if isinstance(steering, (str, os.PathLike)):
        raise TypeError(f"steering= takes a Steering (or None), got the path {str(steering)!r}: load it once with "
                        f"Steering.from_pretrained({str(steering)!r}) and pass that, or call pipe.set_steering(path) "
                        "to steer every later call")
    if steering is not None and not isinstance(steering, Steering):
        raise TypeError(f"steering= takes a Steering (or None for the one set with set_steering), got "
                        f"{type(steering).__name__}")
    for name, value in (("steer_negative", steer_negative), ("gated", gated),
                        ("return_steering_scales", return_steering_scales)):
        check_bool(value, name)
    return check_strength(steering_strength, "steering_strength")


_TOKENIZER_TURNS: "weakref.WeakKeyDictionary[object, threading.RLock]" = weakref.WeakKeyDictionary()
_TURNS_LOCK = threading.Lock()


def _tokenizer_turn(tokenizer):
    """A lock per tokenizer. A fast tokenizer sets its padding and truncation in place whenever a call
    asks for other ones (the stock encode_prompt asks for two), so two threads encoding at once can
    get each other's padding: measured, 64 wrong encodings in 24,000 from 4 threads. Named pipelines
    that share a tokenizer (`from_pipe`) take turns with it."""
    if tokenizer is None:
        return ExitStack()
    with _TURNS_LOCK:
        lock = _TOKENIZER_TURNS.get(tokenizer)
        if lock is None:
            lock = _TOKENIZER_TURNS[tokenizer] = threading.RLock()
        return lock
