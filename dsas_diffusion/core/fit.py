"""Fitting a Steering from pooled activations of the three example sets (source, target, control).

Framework-free: integrations collect the activations (mean over tokens or spatial positions,
padding excluded) and hand them over as {layer name: (examples, D)} tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .config import LayerInfo, LayerKind, SteeringConfig
from .gate import fit_gate
from .maps import map_class
from .steering import Steering


def check_example_sets(source: Sequence, target: Sequence, control: Sequence, min_size: int = 2,
                       pca_rank: int | None = None) -> None:
    """Reject empty, tiny or one-class example sets, or too few for the gate's PCA, before any model runs."""
    for label, items in (("source", source), ("target", target), ("control", control)):
        if isinstance(items, str):
            raise TypeError(f"{label} must be a list of examples, not one string: pass [{items!r}, ...]")
        if len(items) == 0:
            raise ValueError(f"the {label} set is empty; pass at least {min_size} examples")
        if len(items) < min_size:
            raise ValueError(f"the {label} set has {len(items)} example(s); pass at least {min_size}")
        if any(not isinstance(x, str) or not x.strip() for x in items):
            raise ValueError(f"the {label} set holds an empty or non-text example; every example must be non-empty text")
    if set(source) == set(control):
        raise ValueError(
            "source and control hold the same examples, so the gate has only one class to learn from; control "
            "must be examples WITHOUT the concept (source: with it)"
        )
    if isinstance(pca_rank, int) and len(source) + len(control) < pca_rank:
        raise ValueError(f"pca_rank={pca_rank} needs at least {pca_rank} source + control examples, got "
                         f"{len(source) + len(control)}; pass more examples or a lower pca_rank")


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


def require_steered_layers(steering: Steering) -> Steering:
    if not steering.steered_layers:
        raise ValueError(
            "no layer's gate separates source from control well enough to be steered "
            f"(threshold {steering.config.accuracy_threshold}):\n{steering.report()}\n"
            "Pass more or more distinct prompts, other layers, or a lower accuracy_threshold"
        )
    return steering
