"""Stable Diffusion 1.x / 2.x with Dynamically Scaled Activation Steering.

A subclass of diffusers' `StableDiffusionPipeline`: loading, schedulers, dtypes, LoRA, callbacks
and the denoising loop are the stock ones. `set_steering` adds forward hooks on the text encoder
layers (per prompt token) and the UNet attention layers (per spatial position); they act only
inside a call of this pipeline, and only for the thread making it, so with no steering set, or
`steering_strength=0`, the images are bit-identical to the stock pipeline's, and so are those of
another pipeline sharing the modules (`from_pipe`), even while a steered call runs in another
thread. The hooks exist before the user compiles the UNet or text encoder, which is what lets
torch.compile trace them.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from contextlib import ExitStack, contextmanager, nullcontext
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

from dsas_diffusion.core import Steering, SteeringHandle
from dsas_diffusion.core.options import check_bool, check_strength
from dsas_diffusion.diffusion.fitting import fit_pipeline_steering
from dsas_diffusion.diffusion.targets import COMPONENTS, clip_token_mask, eos_token_id


@dataclass
class DSASStableDiffusionPipelineOutput(StableDiffusionPipelineOutput):
    """`steering_scales`: the lambdas that were applied, per layer name:
    text encoder layers (batch, tokens) for the prompts; UNet layers (steps, batch * images per
    prompt, height, width) over the conditional branch. None when no steering ran."""

    steering_scales: dict[str, torch.Tensor] | None = None


@dataclass
class _SteeringCall:
    """The hooks of one pipeline call; dropped when the call ends."""

    text_encoder: SteeringHandle | None
    unet: SteeringHandle | None
    steer_negative: bool


class DSASStableDiffusionPipeline(StableDiffusionPipeline):
    r"""Stable Diffusion with a DSAS `Steering`: fit with `fit_steering`, set with `set_steering`,
    and choose the global strength (alpha) per call with `steering_strength`."""

    steering: Steering | None = None
    _steering_handles: Mapping[str, SteeringHandle] = MappingProxyType({})  # per instance once set

    @property
    def _steering_call(self) -> _SteeringCall | None:
        """This thread's call of this pipeline, while one runs: another thread's call is not ours."""
        return getattr(_CALLS, "by_pipeline", {}).get(id(self))

    # 1. Fitting and setting a steering --------------------------------------------------------
    def fit_steering(self, source, target, control, method: str = "linear_act", **kwargs) -> Steering:
        """Fit maps (source -> target) and gates (source vs control) on this pipeline's text encoder
        and/or UNet attention layers; see `dsas_diffusion.diffusion.fit_pipeline_steering`."""
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
        if steering is not None:
            self._check_steering(steering, check_model)
        # the new hooks first: if they are refused, the steering set before stays in place
        handles = self._attach_steering(steering) if steering is not None else {}
        for handle in self._steering_handles.values():
            handle.detach()
        self._steering_handles = handles
        self.steering = steering

    def _attach_steering(self, steering: Steering) -> dict[str, SteeringHandle]:
        """Inactive hooks (strength 0) on every fitted layer; a call switches them on and off."""
        eos = eos_token_id(self.tokenizer, self.text_encoder)
        options = {"text_encoder": {"pre_forward": clip_token_mask(eos)}, "unet": {"skip_first_token": False}}
        handles = {}
        try:
            for component in COMPONENTS:
                if any(n.startswith(f"{component}.") for n in steering.layers):
                    # owner=self: this pipeline switches on one of its own attachments per call, so the ones set
                    # with set_steering and a per-call steering's may share modules; anyone else's may not
                    handles[component] = steering.attach(
                        getattr(self, component), 0.0, prefix=f"{component}.", layers=steering.layers,
                        check_model=False, owner=self, **options[component])
        except BaseException:
            for handle in handles.values():
                handle.detach()
            raise
        return handles

    def _check_steering(self, steering: Steering, check_model: bool) -> None:
        foreign = [n for n in steering.layers if n.split(".", 1)[0] not in COMPONENTS]
        if foreign:
            raise ValueError(
                f"this steering targets layers outside the text encoder and UNet ({foreign[0]!r} ...); it was fitted "
                "on another kind of model (a language model?): fit one with `pipe.fit_steering`"
            )
        used = {n.split(".", 1)[0] for n in steering.layers}
        for component in COMPONENTS:
            if check_model and component in used:
                steering.check_model(getattr(self, component), component, component)

    # 2. Encoding the prompt: steer the positive branch only ------------------------------------
    def encode_prompt(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance,
                      negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
                      lora_scale=None, clip_skip=None):
        # The stock method encodes both branches in one go; calling it once per branch (the positive
        # one first, at one image per prompt) lets the hooks tell them apart, with the same numbers.
        call = self._steering_call
        te = call.text_encoder if call is not None else None
        with _tokenizer_turn(self.tokenizer):
            if prompt_embeds is None:
                with _enabled(te, True):
                    prompt_embeds, _ = super().encode_prompt(prompt, device, 1, False, lora_scale=lora_scale,
                                                             clip_skip=clip_skip)
            with _enabled(te, call is not None and call.steer_negative):
                prompt_embeds, negative_prompt_embeds = super().encode_prompt(
                    prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt,
                    prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                    lora_scale=lora_scale, clip_skip=clip_skip)
        if call is not None and call.unet is not None and do_classifier_free_guidance and not call.steer_negative:
            n = prompt_embeds.shape[0]  # the UNet batch is [negative; positive]
            call.unet.rows = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)]).to(device)
        return prompt_embeds, negative_prompt_embeds

    # 3. Generating ----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, *args, steering: Steering | None = None, steering_strength: float = 1.0,
                 steer_negative: bool = False, gated: bool = True, return_steering_scales: bool = True, **kwargs):
        r"""Everything `StableDiffusionPipeline.__call__` takes, plus:

        steering: use this steering for this call instead of the one set with `set_steering`.
        steering_strength: the global strength alpha; 0 runs the stock pipeline untouched.
        steer_negative: also steer the unconditional (negative prompt) branch of guidance.
        gated: False applies plain steering (lambda = 1 at every fitted layer), for comparisons.
        return_steering_scales: record the lambdas (`output.steering_scales`).

        With `return_dict=False` the stock tuple (images, nsfw flags) is returned, without scales.
        """
        steering_strength = _check_call_options(steering, steering_strength, steer_negative, gated,
                                                return_steering_scales)
        steering = steering if steering is not None else self.steering
        if steering is None or steering_strength == 0:
            return self._output(super().__call__(*args, **kwargs), None)
        if steering is not self.steering:
            self._check_steering(steering, check_model=True)

        # 3.1 switch the hooks on for this call, in this thread only (a per-call steering gets hooks of its own)
        handles = self._steering_handles if steering is self.steering else self._attach_steering(steering)
        try:
            with ExitStack() as on:
                for handle in handles.values():
                    handle.reset()
                    on.enter_context(handle.local_options(strength=steering_strength, gated=gated,
                                                          record_scales=return_steering_scales))
                on.enter_context(_calling(self, _SteeringCall(handles.get("text_encoder"), handles.get("unet"),
                                                              steer_negative)))
                # 3.2 the stock pipeline, unchanged
                output = super().__call__(*args, **kwargs)
                # 3.3 the lambdas that were applied
                scales = self._collect_scales(handles, kwargs) if return_steering_scales else None
        finally:
            for handle in handles.values():
                handle.reset()
                if handle not in self._steering_handles.values():
                    handle.detach()
        return self._output(output, scales)

    def _collect_scales(self, handles, kwargs) -> dict[str, torch.Tensor]:
        scales = {}
        if "text_encoder" in handles:  # first recorded call: the positive prompts
            for local, chunks in handles["text_encoder"].history.items():
                scales[handles["text_encoder"].layer_names[local]] = chunks[0].squeeze(-1).float().cpu()
        if "unet" in handles:
            unet = handles["unet"]
            height = kwargs.get("height") or self.unet.config.sample_size * self.vae_scale_factor
            width = kwargs.get("width") or self.unet.config.sample_size * self.vae_scale_factor
            h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
            for name, lam in unet.scales.items():  # (steps, rows, positions)
                if unet.rows is not None:
                    lam = lam[:, lam.shape[1] // 2:]
                scales[name] = _as_image_grid(lam.float().cpu(), h, w)
        return scales

    @staticmethod
    def _output(output, scales):
        if not isinstance(output, StableDiffusionPipelineOutput):
            return output
        return DSASStableDiffusionPipelineOutput(images=output.images,
                                                 nsfw_content_detected=output.nsfw_content_detected,
                                                 steering_scales=scales)


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


_CALLS = threading.local()  # `by_pipeline`: {id(pipeline): its call under way in this thread}
_TOKENIZER_TURNS: "weakref.WeakKeyDictionary[object, threading.RLock]" = weakref.WeakKeyDictionary()
_TURNS_LOCK = threading.Lock()


def _tokenizer_turn(tokenizer):
    """A lock per tokenizer. A fast tokenizer sets its padding and truncation in place whenever a call
    asks for other ones (the stock encode_prompt asks for two), so two threads encoding at once can
    get each other's padding: measured, 64 wrong encodings in 24,000 from 4 threads. Pipelines of
    this class that share a tokenizer (`from_pipe`) take turns with it."""
    if tokenizer is None:  # prompt embeddings given, nothing to tokenize
        return nullcontext()
    with _TURNS_LOCK:
        lock = _TOKENIZER_TURNS.get(tokenizer)
        if lock is None:
            lock = _TOKENIZER_TURNS[tokenizer] = threading.RLock()
        return lock


@contextmanager
def _calling(pipe: DSASStableDiffusionPipeline, call: _SteeringCall):
    calls = _CALLS.__dict__.setdefault("by_pipeline", {})
    outer = calls.get(id(pipe))
    calls[id(pipe)] = call
    try:
        yield
    finally:
        if outer is None:
            del calls[id(pipe)]
        else:
            calls[id(pipe)] = outer


@contextmanager
def _enabled(handle: SteeringHandle | None, on: bool):
    """The handle's hooks off inside the block when not `on`, for this thread's calls only."""
    if handle is None or on:
        yield
        return
    with handle.local_options(strength=0.0):
        yield


def _as_image_grid(lam: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(steps, rows, positions) -> (steps, rows, H, W) at the layer's own resolution."""
    positions = lam.shape[-1]
    factor = round(math.sqrt(h * w / positions))
    for hh, ww in ((h // factor, w // factor), (math.ceil(h / factor), math.ceil(w / factor))):
        if hh * ww == positions:
            return lam.reshape(*lam.shape[:-1], hh, ww)
    return lam
