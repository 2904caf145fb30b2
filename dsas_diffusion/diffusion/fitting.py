"""Fitting a Steering on a diffusers pipeline of any supported family, stage by stage.

1. Text encoders: every prompt is encoded by the pipeline's own `encode_prompt` (so each encoder
   reads the tokens, lengths and masks the pipeline gives it); the pooled activations of every
   layer (padding excluded) -> maps and gates. Steering learned through the model (LinEAS maps,
   end-to-end gates) is then trained on all text encoders jointly (core/learned.py), its loss on
   their own layers' activations, by running `encode_prompt` with gradients.
2. Denoiser: the stock pipeline is run for every prompt with the text encoder steering of step 1
   applied through `apply_dsas`'s integration (source and control; target runs unsteered), and the
   spatial mean of each layer's image stream over the positive branch of guidance (read from the
   family's CFG layout) is recorded at every denoising step -> maps and gates. So the denoiser is
   fitted on the activations it will really receive [choice: fitting both stages on the unsteered
   model would steer twice].

Any steering already applied to the pipeline is switched off while fitting, and the pipeline runs
through its stock class's `__call__`, with nothing a stock `__call__` would silently swallow: a
stock pipeline and its named counterpart fit the same steering.

Learned steering stays in the text encoders [choice, counted]: learning the denoiser's maps would
backpropagate through the denoising loop, or at least through steps run on latents recorded without
the steering (not what they meet at run time). One learning step of 20 prompts through SD 1.5's
UNet for a single denoising step (512 px, CFG) is 96 TFLOP forward and backward, 121x the 0.80 TFLOP
of its text encoder, and every recorded step multiplies it (`python -m benchmarks.toy_learned_t2i
--denoiser-cost`). The denoiser is steered with closed-form maps and two-stage gates only.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from ..core import ActivationCapture, Steering, SteeringConfig, check_example_sets, find_modules, fit_from_activations
from ..core.fit import require_steered_layers
from ..core.fingerprint import fingerprint
from ..core.fit_inputs import (check_fit_options, check_gate_sets, choice, flag, layer_pattern, method_name,
                               positive_int, real_number, seed_int)
from ..core.learned import train_steering, training_options
from ..core.maps import map_class
from ..core.modules import check_weights_loaded
from ..core.registry import gate_kinds
from .families import TEXT_ENCODER_LAYERS, Family, family_of
from .integration import applied_to, attach_to_pipeline, following_calls
from .padding import eos_token_id, padding_mask

# fit_pipeline_steering's own arguments, named when an unknown keyword is refused
_ARGUMENTS = ("steer", "text_encoder_layers", "denoiser_layers", "unet_layers", "transformer_layers",
              "num_inference_steps", "guidance_scale", "height", "width", "batch_size", "seed", "progress", "state",
              "pipeline_kwargs", "gate_source", "gate_control", "gates", "training")


def check_pipeline(pipe, family: Family, stages: set[str]) -> None:
    needed = [te for te, _ in family.text_encoders if getattr(pipe, te, None) is not None]
    if not needed:
        raise ValueError("the pipeline has no text encoder, which fitting needs; load a complete pipeline")
    if "denoiser" in stages:
        needed += [family.denoiser, "scheduler"]
    for component in needed:
        if getattr(pipe, component, None) is None:
            raise ValueError(f"the pipeline has no {component}, which fitting the {family.denoiser} needs; load a "
                             "complete pipeline")
    for component in family.components:
        if isinstance(getattr(pipe, component, None), torch.nn.Module):
            check_weights_loaded(getattr(pipe, component), component)


def check_image_size(pipe, name: str, value) -> int | None:
    """None (the model's size) or a positive multiple of 8 and of the VAE's downscaling factor (FLUX:
    twice that, its latents are packed 2x2), checked before the text encoder stage runs (the pipeline
    itself would refuse it only in the denoiser stage)."""
    if value is None:
        return None
    factor = math.lcm(8, getattr(pipe, "vae_scale_factor", 8) * (2 if family_of(pipe).name == "flux" else 1))
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


def check_pipeline_kwargs(pipe, family: Family, value) -> dict:
    """Extra arguments for the pipeline calls of the denoiser stage, each one the stock `__call__` takes
    by name: a stock `__call__` swallows unknown keywords (`**kwargs`), so a misspelt one would
    silently fit something else."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise TypeError(f"pipeline_kwargs must be a dict of {family.pipeline}.__call__ arguments, e.g. "
                        f"{{'use_resolution_binning': False}}, got {type(value).__name__}")
    stock = _stock_class(pipe, family)
    known = {n for n, p in inspect.signature(stock.__call__).parameters.items() if p.kind is p.KEYWORD_ONLY
             or p.kind is p.POSITIONAL_OR_KEYWORD} - {"self"}
    owned = {"prompt", "generator", "output_type", "num_inference_steps", "guidance_scale", "height", "width"}
    unknown = sorted(set(value) - known)
    if unknown:
        raise TypeError(f"pipeline_kwargs: {family.pipeline}.__call__ takes no argument {unknown[0]!r}; it would be "
                        "swallowed silently and fitting would not do what you asked")
    given = sorted(set(value) & owned)
    if given:
        raise TypeError(f"pipeline_kwargs: {given[0]!r} is set by the fit itself; pass it as fit_steering's own "
                        "argument")
    return dict(value)


def check_prompt_lengths(pipe, family: Family, prompts: Sequence[str], label: str) -> None:
    for te, tok_name in family.text_encoders:
        tokenizer = getattr(pipe, tok_name, None)
        if tokenizer is None or getattr(pipe, te, None) is None:
            continue
        limit = family.max_length.get(te, tokenizer.model_max_length)
        lengths = [len(ids) for ids in tokenizer(list(prompts)).input_ids]
        for prompt, n in zip(prompts, lengths):
            if n > limit:
                raise ValueError(
                    f"a {label} prompt has {n} tokens but the text encoder takes at most {limit}; the rest would be "
                    f"cut off and the steering fitted on text the model never sees. Shorten it: {prompt[:80]!r}..."
                )


def _stock_class(pipe, family: Family) -> type:
    return next(c for c in type(pipe).__mro__ if c.__name__ == family.pipeline)


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
def collect_text_encoders(pipe, family: Family, prompts: Sequence[str], names: dict[str, list[str]],
                          batch_size: int, desc: str, progress: bool = True, state=None,
                          options: dict | None = None, skip_first: bool = True) -> dict[str, torch.Tensor]:
    """{full layer name: (prompts, D)} over every text encoder in `names`, from the pipeline's own encoding,
    over the positions run time steers (`skip_first`: the steering's skip_first_token, for encoders with a BOS)."""
    device = getattr(pipe, "_execution_device", None) or pipe.device
    results = []
    with ExitStack() as stack:
        caps = {te: stack.enter_context(ActivationCapture(
            getattr(pipe, te), layers, what=te,
            pre_forward=_padding(pipe, family, te), skip_first=family.skip_first_token(te, skip_first)))
            for te, layers in names.items()}
        for start, batch in tqdm(_batches(prompts, batch_size, state), desc=desc, leave=False, disable=not progress):
            family.encode(pipe, batch, device, options or {})
            results.append((start, {f"{te}.{k}": v for te, cap in caps.items() for k, v in _take(cap).items()}))
    results = _gathered(state, results)
    return {n: torch.cat([acts[n] for _, acts in results]) for n in results[0][1]}


@torch.no_grad()
def collect_denoiser(pipe, family: Family, prompts, names, *, steering, batch_size, seed, desc, progress=True,
                     state=None, **call_kwargs):
    """Spatial means per (prompt, step) over the positive branch; returns (acts, prompt index per row)."""
    results = []
    denoiser = getattr(pipe, family.denoiser)
    stock_call = _stock_class(pipe, family).__call__
    elements = {n: family.element(denoiser.get_submodule(n)) for n in names}
    with ActivationCapture(denoiser, names, what=family.denoiser, elements=elements, skip_first=False) as cap, \
            _quiet(pipe), \
            following_calls(pipe, capture=cap), _steered(pipe, steering):
        for start, batch in tqdm(_batches(prompts, batch_size, state), desc=desc, leave=False, disable=not progress):
            n = len(batch)
            gens = [torch.Generator().manual_seed(seed + start + i) for i in range(n)]
            stock_call(pipe, batch, generator=gens, output_type="latent", **call_kwargs)
            acts = {f"{family.denoiser}.{k}": v for k, v in _take(cap).items()}
            steps = len(next(iter(acts.values()))) // n
            results.append((start, acts, torch.arange(start, start + n).repeat(steps)))
    results = _gathered(state, results)
    return ({name: torch.cat([acts[name] for _, acts, _ in results]) for name in results[0][1]},
            torch.cat([groups for _, _, groups in results]))


def fit_pipeline_steering(
    pipe,
    source: Sequence[str],
    target: Sequence[str],
    control: Sequence[str],
    method: str = "linear_act",
    *,
    steer: str | None = None,
    text_encoder_layers: str | None = TEXT_ENCODER_LAYERS,
    denoiser_layers: str | None = None,
    num_inference_steps: int = 10,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    state=None,
    pipeline_kwargs: dict | None = None,
    gate_source: Sequence[str] | None = None,
    gate_control: Sequence[str] | None = None,
    gates: str = "two_stage",
    training: dict | None = None,
    **config_options,
) -> Steering:
    """Fit on a stock or named pipeline of any supported family (`dsas_diffusion.diffusion.FAMILIES`).

    steer: "both" (the default for closed-form steering), "text_encoder" (every text encoder; the
    default, and the only place, for learned steering) or the denoiser ("unet", "transformer", or
    "denoiser" for either). `text_encoder_layers` / `denoiser_layers` (also spelt after the
    denoiser, `unet_layers` / `transformer_layers`): regular expressions over a component's module
    names (None: the family's default). guidance_scale: None keeps the pipeline's default.
    pipeline_kwargs: other arguments of the stock `__call__` for the denoiser stage (e.g. PixArt's
    `use_resolution_binning=False`). `state` (accelerate's PartialState) splits activation
    collection between processes; every process then fits the same steering from the gathered
    activations, bit-identical to one process. Prompts the tokenizer cannot tell apart are dropped
    as duplicates, with a warning. `gate_source` / `gate_control`: fit the gates on these prompts
    instead (a conditional steering: the map of one concept applied where the gate of another fires,
    the paper's "blur only where there is a banana"); either defaults to source / control.

    Learned through the text encoders, all of them jointly (SDXL's two CLIPs, SD3's three encoders,
    FLUX's CLIP and T5), the loss on their layers' activations (core/learned.py):
    - `method="lineas"`: per-unit affine maps at every layer; with the default two-stage gates this
      is LinEAS + DSAS, and applied with `gated=False` plain LinEAS.
    - `gates="e2e"`: the gates learned with the maps (or alone, for a closed-form map), starting from
      the two-stage ones; `gate_activation="relu"` learns ReLU gates.
    - `training`: options of the learning (`core.learned.TrainingOptions`: steps, lr, batch_size,
      control_weight, sparsity, patience, min_improvement), e.g. `training={"steps": 200}`."""
    # 1. inputs, before any model runs
    family = family_of(pipe)
    denoiser = family.denoiser
    method = method_name(method)
    gates = choice("gates", gates, gate_kinds())
    learned = map_class(method).learned or gates == "e2e"
    steer = choice("steer", ("text_encoder" if learned else "both") if steer is None else steer,
                   ("both", "text_encoder", "denoiser", denoiser))
    stages = {"text_encoder", "denoiser"} if steer == "both" else {"text_encoder" if steer == "text_encoder"
                                                                    else "denoiser"}
    if learned and "denoiser" in stages:
        raise ValueError(f"method={method!r} with gates={gates!r} is learned through the text encoders only (learning "
                         f"the {denoiser}'s would backpropagate through the denoising loop); pass "
                         "steer='text_encoder' (the default for learned steering), or a closed-form method with "
                         "two-stage gates to steer the denoiser")
    if training is not None and not learned:
        raise ValueError(f"training options apply to what is learned through the model (method='lineas' or "
                         f"gates='e2e'); method={method!r} with gates={gates!r} learns nothing: drop training=")
    options = training_options(training)
    spelt = "denoiser_layers"
    if f"{denoiser}_layers" in config_options:
        if denoiser_layers is not None:
            raise TypeError(f"pass the {denoiser} layers once, as denoiser_layers or {denoiser}_layers")
        spelt = f"{denoiser}_layers"
        denoiser_layers = config_options.pop(spelt)
    config_options = check_fit_options(config_options, "fit_pipeline_steering", _ARGUMENTS)
    text_encoder_layers = layer_pattern("text_encoder_layers", text_encoder_layers, allow_none=True,
                                        fix=f"text_encoder_layers=r'{TEXT_ENCODER_LAYERS}' (the default)") \
        or TEXT_ENCODER_LAYERS
    denoiser_layers = layer_pattern(spelt, denoiser_layers, allow_none=True,
                                    fix=f"{spelt}=r'{family.denoiser_layers}' (this {family.name} default)") \
        or family.denoiser_layers
    num_inference_steps = positive_int("num_inference_steps", num_inference_steps)
    if guidance_scale is not None:
        guidance_scale = real_number("guidance_scale", guidance_scale, fix="; pass e.g. guidance_scale=7.5")
    height, width = check_image_size(pipe, "height", height), check_image_size(pipe, "width", width)
    batch_size = positive_int("batch_size", batch_size)
    seed = seed_int("seed", seed)
    progress = flag("progress", progress)
    check_state(state)
    pipeline_kwargs = check_pipeline_kwargs(pipe, family, pipeline_kwargs)
    check_pipeline(pipe, family, stages)
    first_tokenizer = next(getattr(pipe, tok) for te, tok in family.text_encoders
                           if getattr(pipe, te, None) is not None)
    key = lambda prompts: first_tokenizer(prompts).input_ids  # noqa: E731  (what the model tells apart)
    pca_rank = config_options.get("pca_rank", 5)
    source, target, control = check_example_sets(source, target, control, pca_rank=pca_rank, key=key, stacklevel=3)
    sets = {"source": source, "target": target, "control": control}
    if gate_source is not None or gate_control is not None:
        if gates == "e2e":
            raise ValueError("gate_source / gate_control give two-stage gates of another concept; end-to-end gates "
                             "learn from source, target and control alone. Pass gates='two_stage' for a conditional "
                             "steering, or drop gate_source / gate_control")
        sets["gate_source"], sets["gate_control"] = check_gate_sets(
            source if gate_source is None else gate_source, control if gate_control is None else gate_control,
            pca_rank=pca_rank, key=key, stacklevel=3)
    for label, prompts in sets.items():
        check_prompt_lengths(pipe, family, prompts, label)
    te_names = _text_encoder_layers(pipe, family, text_encoder_layers) if "text_encoder" in stages else {}
    denoiser_names = find_modules(getattr(pipe, denoiser), denoiser_layers, denoiser, spelt) \
        if "denoiser" in stages else []
    config = SteeringConfig(method=method, seed=seed, base_model=str(getattr(pipe, "name_or_path", None) or "") or None,
                            gates=gates, num_examples={label: len(prompts) for label, prompts in sets.items()},
                            **config_options)
    parts: list[Steering] = []

    with _all_off(pipe):
        # 2. the text encoders, all at once (and, for learned steering, trained jointly through them)
        if te_names:
            acts = {label: collect_text_encoders(pipe, family, prompts, te_names, batch_size, f"text encoders: {label}",
                                                 progress, state, pipeline_kwargs, config.skip_first_token)
                    for label, prompts in sets.items()}

            def learn(steering: Steering) -> Steering:
                if gates != "e2e":  # two-stage gates: nothing to steer is known before learning
                    require_steered_layers(steering)
                return _learn_in_text_encoders(pipe, family, steering, sets, acts["target"], options, pipeline_kwargs,
                                               progress)

            parts.append(_fit_components(pipe, list(te_names), acts, config, text_encoder_layers, "tokens", progress,
                                         refine=learn if learned else None))

        # 3. the denoiser, on what the steered text encoders give it (the target prompts run unsteered)
        if denoiser_names:
            te_steering = _merge(parts, config, require=False) if parts else None
            call = dict(num_inference_steps=num_inference_steps, height=height, width=width, **pipeline_kwargs)
            if guidance_scale is not None:
                call["guidance_scale"] = guidance_scale
            kw = dict(names=denoiser_names, batch_size=batch_size, seed=seed, progress=progress, state=state, **call)
            acts, groups = {}, {}
            for label, prompts in sets.items():
                acts[label], groups[label] = collect_denoiser(
                    pipe, family, prompts, steering=None if label == "target" else te_steering,
                    desc=f"{denoiser}: {label}", **kw)
            gated = ("gate_source", "gate_control") if "gate_source" in sets else ("source", "control")
            module = getattr(pipe, denoiser)
            elements = {f"{denoiser}.{n}": family.element(module.get_submodule(n)) for n in denoiser_names}
            parts.append(_fit_components(pipe, [denoiser], acts, config, denoiser_layers, "spatial", progress,
                                         source_groups=groups[gated[0]], control_groups=groups[gated[1]],
                                         elements=elements, require_steered=stages == {"denoiser"}))

    return _merge(parts, config)


def _learn_in_text_encoders(pipe, family: Family, steering: Steering, sets: dict[str, list[str]],
                            target: dict[str, torch.Tensor], options, pipeline_kwargs: dict,
                            progress: bool) -> Steering:
    """`steering` trained through every text encoder it steers at once, by running the pipeline's own
    `encode_prompt` with gradients on batches of the fitting prompts (core/learned.py)."""
    device = getattr(pipe, "_execution_device", None) or pipe.device
    encoders = {te: getattr(pipe, te) for te in steering.config.targets}
    on_device = {n: a.to(next(encoders[n.split(".", 1)[0]].parameters()).device) for n, a in target.items()}

    def run(label: str, rows) -> None:
        family.encode(pipe, [sets[label][i] for i in rows], device, pipeline_kwargs)

    trained, _ = train_steering(
        steering, encoders, run, {"source": len(sets["source"]), "control": len(sets["control"])}, on_device, options,
        pre_forward={te: _padding(pipe, family, te) for te in encoders},
        skip_first_token={te: family.skip_first_token(te, steering.config.skip_first_token) for te in encoders},
        progress=progress)
    return trained


def _padding(pipe, family: Family, te: str):
    """A text encoder's pre_forward marking its real tokens."""
    return padding_mask(eos_token_id(getattr(pipe, family.tokenizer_of(te), None), getattr(pipe, te)))


def _text_encoder_layers(pipe, family: Family, pattern: str) -> dict[str, list[str]]:
    """Matching layers per text encoder; an encoder without a match is left out, none at all is an error."""
    names, errors = {}, []
    for te, _ in family.text_encoders:
        encoder = getattr(pipe, te, None)
        if encoder is None:
            continue
        try:
            names[te] = find_modules(encoder, pattern, te, "text_encoder_layers")
        except ValueError as e:
            errors.append(e)
    if not names:
        raise errors[0]
    return names


def _fit_components(pipe, components: list[str], acts, config, pattern, kind, progress, require_steered=False,
                    **extra):
    """`acts`: {set label: {layer: (examples, D)}} over the layers of `components`, gate sets included when given."""
    info = {c: fingerprint(getattr(pipe, c)) for c in components}
    cfg = replace(config, fingerprint={c: i for c, (i, _) in info.items()}, targets={c: pattern for c in components},
                  layers={})
    return fit_from_activations(acts["source"], acts["target"], acts["control"], cfg,
                                kinds={k: kind for k in acts["source"]}, probes={c: p for c, (_, p) in info.items()},
                                gate_source=acts.get("gate_source"), gate_control=acts.get("gate_control"),
                                require_steered=require_steered, progress=progress, **extra)


def _merge(parts: list[Steering], config: SteeringConfig, require: bool = True) -> Steering:
    maps, gates, probes = {}, {}, {}
    config = replace(config, fingerprint={}, targets={}, layers={}, training={})
    for p in parts:
        maps.update(p.maps), gates.update(p.gates), probes.update(p.probes)
        config.fingerprint.update(p.config.fingerprint)
        config.targets.update(p.config.targets)
        config.layers.update(p.config.layers)
        config.training.update(p.config.training)  # how the text encoders' steering was learned, if it was
    steering = Steering(config, maps, gates, probes)
    return require_steered_layers(steering) if require else steering


@contextmanager
def _all_off(pipe):
    """Every steering applied to the pipeline (by apply_dsas, or set on a named pipeline) off, in this thread."""
    with ExitStack() as stack:
        for applied in applied_to(pipe):
            stack.enter_context(applied.local_options(strength=0.0, record_scales=False))
        yield


@contextmanager
def _steered(pipe, steering: Steering | None):
    """The text encoder steering of stage 1 applied to the pipeline for the block (None: unsteered)."""
    if steering is None:
        yield
        return
    applied = attach_to_pipeline(pipe, steering, 1.0, check_model=False)
    try:
        with applied.local_options(record_scales=False):
            yield
    finally:
        applied.remove()


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
