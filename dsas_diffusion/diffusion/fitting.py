"""Fitting a Steering on a Stable Diffusion pipeline, stage by stage.

1. Text encoder: pooled activations of every prompt (padding excluded) -> maps and gates.
2. UNet attention: the pipeline is run for every prompt with the text encoder steering of
   step 1 attached (source and control; target runs unsteered), and the spatial mean of each
   attention output on the conditional half of the CFG batch is recorded at every denoising
   step -> maps and gates. So the UNet is fitted on the activations it will really receive
   [choice: fitting both stages on the unsteered model would steer twice].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Literal

import torch
from tqdm.auto import tqdm

from ..core import ActivationCapture, Steering, SteeringConfig, check_example_sets, find_modules, fit_from_activations
from ..core.fit import require_steered_layers
from ..core.fingerprint import fingerprint
from ..core.fit_inputs import (check_fit_options, flag, layer_pattern, method_name, positive_int, real_number,
                               seed_int)
from ..core.modules import check_weights_loaded
from .targets import TEXT_ENCODER_LAYERS, UNET_LAYERS, clip_token_mask, eos_token_id

Where = Literal["both", "text_encoder", "unet"]


# fit_pipeline_steering's own arguments, named when an unknown keyword is refused
_ARGUMENTS = ("steer", "text_encoder_layers", "unet_layers", "num_inference_steps", "guidance_scale", "height",
              "width", "batch_size", "seed", "progress", "state")


def check_pipeline(pipe, steer: str) -> None:
    for component in ("tokenizer", "text_encoder") + (("unet", "scheduler") if steer != "text_encoder" else ()):
        if getattr(pipe, component, None) is None:
            raise ValueError(f"the pipeline has no {component}, which fitting with steer={steer!r} needs; load a "
                             "complete Stable Diffusion pipeline")
    for component in ("text_encoder", "unet"):
        if getattr(pipe, component, None) is not None:
            check_weights_loaded(getattr(pipe, component), component)


def check_image_size(pipe, name: str, value) -> int | None:
    """None (the model's size) or a positive multiple of 8 (what Stable Diffusion pipelines accept) and of
    the VAE's downscaling factor, checked before the text encoder stage runs (the pipeline itself would
    refuse it only in the UNet stage)."""
    if value is None:
        return None
    factor = math.lcm(8, getattr(pipe, "vae_scale_factor", 8))
    value = positive_int(name, value, f"; pass None (the model's size) or a multiple of {factor}")
    if value % factor:
        raise ValueError(f"{name} must be a multiple of {factor}, got {value}; pass e.g. "
                         f"{name}={max(factor, value // factor * factor)}")
    return value


def check_state(state) -> None:
    if state is None:
        return
    n, i = getattr(state, "num_processes", None), getattr(state, "process_index", None)
    if not (isinstance(n, int) and isinstance(i, int) and 0 <= i < n):
        raise TypeError(f"state must be None or accelerate's PartialState (num_processes, process_index), got "
                        f"{type(state).__name__}")


def check_prompt_lengths(tokenizer, prompts: Sequence[str], label: str) -> None:
    limit = tokenizer.model_max_length
    lengths = [len(ids) for ids in tokenizer(list(prompts)).input_ids]
    for prompt, n in zip(prompts, lengths):
        if n > limit:
            raise ValueError(
                f"a {label} prompt has {n} tokens but the text encoder takes at most {limit}; the rest would be cut "
                f"off and the steering fitted on text the model never sees. Shorten it: {prompt[:80]!r}..."
            )


def _batches(items: Sequence[str], size: int, state=None) -> list[tuple[int, list[str]]]:
    """(start, prompts) of this process's batches: whole batches of the single-process run, dealt
    round-robin, so every batch (and so every activation) is exactly what one process computes."""
    batches = [(i, list(items[i:i + size])) for i in range(0, len(items), size)]
    if state is None or state.num_processes == 1:
        return batches
    return batches[state.process_index::state.num_processes]


def _gathered(state, results: list[tuple]) -> list[tuple]:
    """Every process's (start, ...) batch results, in batch order."""
    if state is not None and state.num_processes > 1:
        from accelerate.utils import gather_object

        results = gather_object(results)
    return sorted(results, key=lambda r: r[0])


def _take(cap: ActivationCapture) -> dict[str, torch.Tensor]:
    """The activations captured since the last take, checked for NaN / inf."""
    acts = cap.collect()
    cap.pooled.clear()
    return acts


@torch.no_grad()
def collect_text_encoder(pipe, prompts: Sequence[str], names: list[str], batch_size: int, desc: str,
                         progress: bool = True, state=None):
    enc = pipe.text_encoder
    mask = clip_token_mask(eos_token_id(pipe.tokenizer, enc))
    results = []
    with ActivationCapture(enc, names, pre_forward=mask, what="text_encoder") as cap:
        for start, batch in tqdm(_batches(prompts, batch_size, state), desc=desc, leave=False, disable=not progress):
            ids = pipe.tokenizer(batch, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            enc(ids.to(enc.device))
            results.append((start, _take(cap)))
    results = _gathered(state, results)
    return {n: torch.cat([acts[n] for _, acts in results]) for n in names}


@torch.no_grad()
def collect_unet(pipe, prompts, names, *, steering, batch_size, seed, desc, progress=True, state=None,
                 **call_kwargs):
    """Spatial means per (prompt, step) on the conditional rows; returns (acts, prompt index per row)."""
    results = []
    cfg = call_kwargs.get("guidance_scale", 7.5) > 1
    with ActivationCapture(pipe.unet, names, what="unet") as cap, _quiet(pipe):
        for start, batch in tqdm(_batches(prompts, batch_size, state), desc=desc, leave=False, disable=not progress):
            n = len(batch)
            cap.rows = torch.cat([torch.zeros(n), torch.ones(n)]).bool() if cfg else None
            gens = [torch.Generator().manual_seed(seed + start + i) for i in range(n)]
            # steering=None here means unsteered, not "the steering the pipeline has set"
            pipe(batch, generator=gens, output_type="latent", steering=steering,
                 steering_strength=1.0 if steering is not None else 0.0, return_steering_scales=False, **call_kwargs)
            acts = _take(cap)
            steps = len(acts[names[0]]) // n
            results.append((start, acts, torch.arange(start, start + n).repeat(steps)))
    results = _gathered(state, results)
    return ({name: torch.cat([acts[name] for _, acts, _ in results]) for name in names},
            torch.cat([groups for _, _, groups in results]))


def fit_pipeline_steering(
    pipe,
    source: Sequence[str],
    target: Sequence[str],
    control: Sequence[str],
    method: str = "linear_act",
    *,
    steer: Where = "both",
    text_encoder_layers: str | None = TEXT_ENCODER_LAYERS,
    unet_layers: str | None = UNET_LAYERS,
    num_inference_steps: int = 10,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    state=None,
    **config_options,
) -> Steering:
    """`state` (accelerate's PartialState) splits activation collection between processes; every
    process then fits the same steering from the gathered activations, bit-identical to one process.
    `text_encoder_layers` / `unet_layers`: regular expressions over the component's module names
    (None: the default). Prompts the tokenizer cannot tell apart are dropped as duplicates, with a warning."""
    # 1. inputs, before any model runs
    if steer not in ("both", "text_encoder", "unet"):
        raise ValueError(f"steer={steer!r} is unknown; choose 'both', 'text_encoder' or 'unet'")
    method = method_name(method)
    config_options = check_fit_options(config_options, "fit_pipeline_steering", _ARGUMENTS)
    text_encoder_layers = layer_pattern("text_encoder_layers", text_encoder_layers, allow_none=True,
                                        fix=f"text_encoder_layers=r'{TEXT_ENCODER_LAYERS}' (the default)") \
        or TEXT_ENCODER_LAYERS
    unet_layers = layer_pattern("unet_layers", unet_layers, allow_none=True,
                                fix=f"unet_layers=r'{UNET_LAYERS}' (the default)") or UNET_LAYERS
    num_inference_steps = positive_int("num_inference_steps", num_inference_steps)
    guidance_scale = real_number("guidance_scale", guidance_scale, fix="; pass e.g. guidance_scale=7.5")
    height, width = check_image_size(pipe, "height", height), check_image_size(pipe, "width", width)
    batch_size = positive_int("batch_size", batch_size)
    seed = seed_int("seed", seed)
    progress = flag("progress", progress)
    check_state(state)
    check_pipeline(pipe, steer)
    source, target, control = check_example_sets(
        source, target, control, pca_rank=config_options.get("pca_rank", 5),
        key=lambda prompts: pipe.tokenizer(prompts).input_ids, stacklevel=3)
    for label, prompts in (("source", source), ("target", target), ("control", control)):
        check_prompt_lengths(pipe.tokenizer, prompts, label)
    te_names = find_modules(pipe.text_encoder, text_encoder_layers, "text_encoder", "text_encoder_layers") \
        if steer in ("both", "text_encoder") else []
    unet_names = find_modules(pipe.unet, unet_layers, "unet", "unet_layers") if steer in ("both", "unet") else []
    config = SteeringConfig(method=method, seed=seed, base_model=str(getattr(pipe, "name_or_path", None) or "") or None,
                            num_examples={"source": len(source), "target": len(target), "control": len(control)},
                            **config_options)
    parts: list[Steering] = []

    if steer in ("both", "text_encoder"):
        acts = [collect_text_encoder(pipe, p, te_names, batch_size, f"text encoder: {label}", progress, state)
                for label, p in (("source", source), ("target", target), ("control", control))]
        parts.append(_fit_component(pipe, "text_encoder", acts, config, text_encoder_layers, "tokens", progress))

    if steer in ("both", "unet"):
        te_steering = parts[0] if parts else None
        kw = dict(names=unet_names, batch_size=batch_size, seed=seed, progress=progress, state=state,
                  num_inference_steps=num_inference_steps,
                  guidance_scale=guidance_scale, height=height, width=width)
        s, s_groups = collect_unet(pipe, source, steering=te_steering, desc="unet: source", **kw)
        t, _ = collect_unet(pipe, target, steering=None, desc="unet: target", **kw)
        c, c_groups = collect_unet(pipe, control, steering=te_steering, desc="unet: control", **kw)
        parts.append(_fit_component(pipe, "unet", (s, t, c), config, unet_layers, "spatial", progress,
                                    source_groups=s_groups, control_groups=c_groups,
                                    require_steered=steer == "unet"))

    return _merge(parts, config)


def _fit_component(pipe, component, acts, config, pattern, kind, progress, require_steered=False, **groups):
    s, t, c = ({f"{component}.{k}": v for k, v in a.items()} for a in acts)
    info, probe = fingerprint(getattr(pipe, component))
    cfg = replace(config, fingerprint={component: info}, targets={component: pattern}, layers={})
    return fit_from_activations(s, t, c, cfg, kinds={k: kind for k in s}, probes={component: probe},
                                require_steered=require_steered, progress=progress, **groups)


def _merge(parts: list[Steering], config: SteeringConfig) -> Steering:
    maps, gates, probes = {}, {}, {}
    config = replace(config, fingerprint={}, targets={}, layers={})
    for p in parts:
        maps.update(p.maps), gates.update(p.gates), probes.update(p.probes)
        config.fingerprint.update(p.config.fingerprint)
        config.targets.update(p.config.targets)
        config.layers.update(p.config.layers)
    return require_steered_layers(Steering(config, maps, gates, probes))


@contextmanager
def _quiet(pipe):
    """Hide the pipeline's own per-call progress bar while the outer fitting bar runs."""
    saved = getattr(pipe, "_progress_bar_config", None)
    pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        if saved is None:
            del pipe._progress_bar_config
        else:
            pipe._progress_bar_config = saved
