"""Fitting a Steering from pooled activations of the three example sets (source, target, control).

Framework-free: integrations collect the activations (mean over tokens or spatial positions,
padding excluded) and hand them over as {layer name: (examples, D)} tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .config import LayerInfo, LayerKind, SteeringConfig
from .fit_inputs import FIT_OPTIONS, check_example_sets, check_fit_options  # noqa: F401  (re-exported)
from .gate import GATE_KINDS, fit_gate
from .maps import map_class
from .steering import Steering


def fit_from_activations(
    source: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    control: dict[str, torch.Tensor],
    config: SteeringConfig,
    *,
    kinds: dict[str, LayerKind] | None = None,
    elements: dict[str, int] | None = None,
    source_groups: torch.Tensor | None = None,
    control_groups: torch.Tensor | None = None,
    probes: dict[str, torch.Tensor] | None = None,
    require_steered: bool = True,
    progress: bool = True,
    gate_source: dict[str, torch.Tensor] | None = None,
    gate_control: dict[str, torch.Tensor] | None = None,
    refine: Callable[[Steering], Steering] | None = None,
) -> Steering:
    """One map (source -> target) and one gate (gate_source vs gate_control) per layer.

    `kinds` and `elements` record, per layer, how its positions are laid out and which element of
    a tuple output was collected (see `LayerInfo`; defaults "tokens" and 0).

    The gate sets default to source and control. Given, they make a conditional steering: the
    map of one concept applied where the gate of another fires (the paper's "blur only where
    there is a banana"). `*_groups` give the prompt index of each row of the sets the gate is
    fitted on when a prompt contributes several rows (one per denoising step), so held-out
    accuracy is measured on unseen prompts.

    `refine` is what an integration then does with its model: learn through it (a learned map
    family such as LinEAS, or `config.gates == "e2e"`, need it: `core.learned.train_steering`
    bound to the model, starting from the identity maps and the two-stage gates fitted here), or
    refit the maps incrementally (`config.incremental`).
    """
    check_fit_options({f: getattr(config, f) for f in FIT_OPTIONS}, "fit_from_activations")
    learned_gates = GATE_KINDS[config.gates].fit is None
    if refine is None and (map_class(config.method).learned or learned_gates or config.incremental):
        raise ValueError(
            f"method={config.method!r} with gates={config.gates!r}"
            f"{' fitted incrementally' if config.incremental else ''} is learned through the model, and "
            "fit_from_activations only sees collected activations; fit it where the model is, e.g. "
            "dsas_diffusion.llm.fit_steering(model, tokenizer, source, target, control, method=..., gates=...)")
    if learned_gates and (gate_source is not None or gate_control is not None):
        raise ValueError("gate_source / gate_control give two-stage gates of another concept; end-to-end gates "
                         "learn from source, target and control alone. Pass gates='two_stage' for a conditional "
                         "steering, or drop gate_source / gate_control")
    gate_source = source if gate_source is None else gate_source
    gate_control = control if gate_control is None else gate_control
    _check_activations(source, target, control)
    _check_activations(source, gate_source, gate_control, ("gate_source", "gate_control"))
    mcls = map_class(config.method)
    fit_gates = GATE_KINDS[config.gates].fit or fit_gate  # learned gates start from two-stage ones
    maps, gates, layers = {}, {}, {}
    for name in tqdm(list(source), desc="fitting layers", disable=not progress, leave=False):
        s, t, c = source[name], target[name], control[name]
        gs, gc = gate_source[name], gate_control[name]
        sets = (("source", s), ("target", t), ("control", c), ("gate_source", gs), ("gate_control", gc))
        for label, acts in sets:
            if not torch.isfinite(acts).all():
                raise ValueError(f"{label} activations of layer {name!r} contain NaN or inf; fit the model in float32")
        if len({acts.shape[1] for _, acts in sets}) > 1:
            raise ValueError(f"layer {name!r}: the activation sets differ in width "
                             f"({', '.join(f'{label} {acts.shape[1]}' for label, acts in sets)})")
        maps[name] = mcls.fit(s, t, clamp_to_source_range=config.clamp_to_source_range, logistic_l2=config.logistic_l2)
        gates[name] = fit_gates(gs, gc, rank=config.pca_rank, l2=config.logistic_l2,
                                held_out_fraction=config.held_out_fraction, seed=config.seed,
                                source_groups=source_groups, control_groups=control_groups, cv_folds=config.cv_folds)
        acc = gates[name].accuracy
        steered = acc != acc or (acc > 0.5 if config.accuracy_scaling else acc >= config.accuracy_threshold)
        layers[name] = LayerInfo(width=s.shape[1], kind=(kinds or {}).get(name, "tokens"), gate_accuracy=acc,
                                 steered=bool(steered),
                                 element=(elements or {}).get(name, 0), gate_accuracy_std=gates[name].accuracy_std)
    config.layers = layers
    steering = Steering(config, maps, gates, probes)
    if refine is not None:
        steering = refine(steering)
    if config.accuracy_scaling:
        steering = _scaled_by_accuracy(steering)
    return require_steered_layers(steering) if require_steered else steering


def accuracy_weight(accuracy: float) -> float:
    """A layer's weight under `accuracy_scaling`: 0 at chance (0.5), 1 at accuracy 1, linear between;
    1 for a gate scored on no held-out prompt or learned end to end (NaN)."""
    return 1.0 if accuracy != accuracy else min(max(2 * accuracy - 1, 0.0), 1.0)


def _scaled_by_accuracy(steering: Steering) -> Steering:
    """The maps weighed by their gate's accuracy, after any learning (which sees them unweighted)."""
    maps = {n: m.scaled(accuracy_weight(steering.config.layers[n].gate_accuracy)) for n, m in steering.maps.items()}
    return Steering(steering.config, maps, steering.gates, steering.probes)


def _check_activations(source: dict, target: dict, control: dict,
                       labels: tuple[str, str] = ("target", "control")) -> None:
    """The sets name the same layers, each with a (examples, width) floating tensor."""
    if not source:
        raise ValueError("no activations to fit: source holds no layer")
    for label, acts in zip(labels, (target, control)):
        if not isinstance(acts, dict):
            raise TypeError(f"{label} activations must be a dict {{layer name: (examples, width) tensor}}, got "
                            f"{type(acts).__name__}")
        if set(acts) != set(source):
            raise ValueError(f"{label} activations are for layers {sorted(acts)}, source ones for {sorted(source)}; "
                             "collect every set at the same layers")
    for label, acts in (("source", source), *zip(labels, (target, control))):
        for name, x in acts.items():
            if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 2 or len(x) == 0:
                got = f"shape {tuple(x.shape)}, {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{label} activations of layer {name!r} must be a non-empty (examples, width) "
                                 f"floating tensor, got {got}")


def require_steered_layers(steering: Steering) -> Steering:
    if not steering.steered_layers:
        raise ValueError(
            "no layer's gate separates source from control well enough to be steered "
            f"(threshold {steering.config.accuracy_threshold}):\n{steering.report()}\n"
            "Pass more or more distinct prompts, other layers, or a lower accuracy_threshold"
        )
    return steering
