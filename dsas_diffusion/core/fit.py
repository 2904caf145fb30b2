"""Fitting a Steering from pooled activations of the three example sets (source, target, control).

Framework-free: integrations collect the activations (mean over tokens or spatial positions,
padding excluded) and hand them over as {layer name: (examples, D)} tensors.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .config import LayerInfo, LayerKind, SteeringConfig
from .fit_inputs import FIT_OPTIONS, check_example_sets, check_fit_options  # noqa: F401  (re-exported)
from .gate import fit_gate
from .maps import map_class
from .steering import Steering


def fit_from_activations(
    source: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    control: dict[str, torch.Tensor],
    config: SteeringConfig,
    *,
    kinds: dict[str, LayerKind] | None = None,
    source_groups: torch.Tensor | None = None,
    control_groups: torch.Tensor | None = None,
    probes: dict[str, torch.Tensor] | None = None,
    require_steered: bool = True,
    progress: bool = True,
) -> Steering:
    """One map (source -> target) and one gate (source vs control) per layer.

    `*_groups` give the prompt index of each row when a prompt contributes several rows (one
    per denoising step), so held-out accuracy is measured on unseen prompts.
    """
    check_fit_options({f: getattr(config, f) for f in FIT_OPTIONS}, "fit_from_activations")
    _check_activations(source, target, control)
    mcls = map_class(config.method)
    maps, gates, layers = {}, {}, {}
    for name in tqdm(list(source), desc="fitting layers", disable=not progress, leave=False):
        s, t, c = source[name], target[name], control[name]
        for label, acts in (("source", s), ("target", t), ("control", c)):
            if not torch.isfinite(acts).all():
                raise ValueError(f"{label} activations of layer {name!r} contain NaN or inf; fit the model in float32")
        if not s.shape[1] == t.shape[1] == c.shape[1]:
            raise ValueError(f"layer {name!r}: source, target and control activations differ in width")
        maps[name] = mcls.fit(s, t, clamp_to_source_range=config.clamp_to_source_range, logistic_l2=config.logistic_l2)
        gates[name] = fit_gate(s, c, rank=config.pca_rank, l2=config.logistic_l2,
                               held_out_fraction=config.held_out_fraction, seed=config.seed,
                               source_groups=source_groups, control_groups=control_groups)
        acc = gates[name].accuracy
        layers[name] = LayerInfo(width=s.shape[1], kind=(kinds or {}).get(name, "tokens"), gate_accuracy=acc,
                                 steered=bool(acc != acc or acc >= config.accuracy_threshold))
    config.layers = layers
    steering = Steering(config, maps, gates, probes)
    return require_steered_layers(steering) if require_steered else steering


def _check_activations(source: dict, target: dict, control: dict) -> None:
    """The three sets name the same layers, each with a (examples, width) floating tensor."""
    if not source:
        raise ValueError("no activations to fit: source holds no layer")
    for label, acts in (("target", target), ("control", control)):
        if set(acts) != set(source):
            raise ValueError(f"{label} activations are for layers {sorted(acts)}, source ones for {sorted(source)}; "
                             "collect all three sets at the same layers")
    for label, acts in (("source", source), ("target", target), ("control", control)):
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
