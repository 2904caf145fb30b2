"""When to steer: a PCA-regularised logistic gate per layer, folded into one linear map.

Trained on mean activations of source (label 1) and control (label 0) examples; at run time
lambda = sigmoid(w . x + b) for every token or spatial position, where w and b fold the
centring, the PCA projection, the whitening and the logistic weights together, so a gate
costs one dot product per position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .linear_probe import fit_logistic_regression, pca


@dataclass
class Gate:
    weight: torch.Tensor  # (D,)
    bias: torch.Tensor  # ()
    accuracy: float  # on held-out examples

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias}


def _fit_folded(x: torch.Tensor, y: torch.Tensor, rank: int, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    mean, components, std = pca(x, rank)
    std = std.clamp_min(1e-12 * (1 + std.max()))
    z = (x.double() - mean) @ components.T / std
    w_z, b_z = fit_logistic_regression(z, y, l2=l2)
    weight = components.T @ (w_z / std)
    return weight, b_z - weight @ mean


def split_held_out(groups: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Boolean mask of held-out samples, splitting by group (prompt) so no prompt is on both sides."""
    ids = torch.unique(groups)
    n_out = min(max(1, math.ceil(fraction * len(ids))), len(ids) - 1) if fraction > 0 else 0
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    return torch.isin(groups, ids[perm[:n_out]])


def fit_gate(
    source: torch.Tensor,
    control: torch.Tensor,
    *,
    rank: int = 5,
    l2: float = 1.0,
    held_out_fraction: float = 0.25,
    seed: int = 0,
    source_groups: torch.Tensor | None = None,
    control_groups: torch.Tensor | None = None,
) -> Gate:
    """Fit on a split to measure held-out accuracy, then refit on every example [choice: with a
    few dozen prompts the extra quarter of the data is worth more than a gate that was never
    scored on exactly its own weights]."""
    sg = torch.arange(len(source)) if source_groups is None else source_groups
    cg = torch.arange(len(control)) if control_groups is None else control_groups
    held_s = split_held_out(sg, held_out_fraction, seed)
    held_c = split_held_out(cg, held_out_fraction, seed + 1)
    n_train = len(torch.unique(sg[~held_s])) + len(torch.unique(cg[~held_c]))
    if n_train < rank:
        raise ValueError(
            f"pca_rank={rank} needs at least {rank} training prompts, but only {n_train} remain after holding "
            f"out {held_out_fraction:.0%} of {len(torch.unique(sg))} source and {len(torch.unique(cg))} control "
            "prompts; pass more prompts or a lower pca_rank"
        )
    x = torch.cat([source, control])
    y = torch.cat([torch.ones(len(source)), torch.zeros(len(control))])
    held = torch.cat([held_s, held_c])
    if held.any():
        w, b = _fit_folded(x[~held], y[~held], rank, l2)
        accuracy = ((x[held].double() @ w + b > 0).double() == y[held]).double().mean().item()
    else:
        accuracy = float("nan")
    w, b = _fit_folded(x, y, rank, l2)
    return Gate(weight=w.float(), bias=b.float(), accuracy=accuracy)
