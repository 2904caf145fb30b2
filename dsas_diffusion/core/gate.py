"""When to steer: a PCA-regularised logistic gate per layer, folded into one linear map.

Trained on mean activations of source (label 1) and control (label 0) examples; at run time
lambda = activate(w . x + b) for every token or spatial position, where w and b fold the
centring, the PCA projection, the whitening and the logistic weights together, so a gate
costs one dot product per position. Gates learned end to end (core/e2e.py) have the same form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .linear_probe import fit_logistic_regression, pca
from .registry import GATE_KINDS, register_gate  # noqa: F401  (GATE_KINDS re-exported)


def activate(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """lambda from gate logits: `sigmoid`, or `relu` clamped to [0, 1] [choice: the paper names a
    ReLU gate without its range; capping it at 1 keeps lambda a strength, so alpha means the same
    for both activations and a learned map cannot hide its scale in the gate, and a negative logit
    gives exactly 0, so inputs the gate rejects are left bit-identical]."""
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    if activation == "relu":
        return logits.clamp(0.0, 1.0)
    raise ValueError(f"gate_activation={activation!r} is unknown; choose 'sigmoid' or 'relu'")


@dataclass
class Gate:
    weight: torch.Tensor  # (D,)
    bias: torch.Tensor  # ()
    accuracy: float  # on held-out examples (the mean over folds with cross-validation)
    accuracy_std: float = float("nan")  # its standard deviation over folds; NaN without cross-validation

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias}


def prompt_weights(groups: torch.Tensor) -> torch.Tensor | None:
    """Per sample, 1 / (samples of its prompt), scaled to mean 1, so each prompt weighs the same in the
    logistic loss and in the accuracy however many samples it gives (a text gives one per position a
    causal gate reads, more the longer it is); None (unweighted) when every prompt gives equally many."""
    _, index, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    if bool((counts == counts[0]).all()):
        return None
    w = 1.0 / counts[index].double()
    return w * (len(groups) / w.sum())


def _score(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Accuracy of the gate (w, b) on (x, y), each prompt weighing the same (`prompt_weights`)."""
    right = ((x.double() @ w + b > 0).double() == y).double()
    weight = prompt_weights(groups)
    return right.mean() if weight is None else (right * weight).mean()


def _fit_folded(x: torch.Tensor, y: torch.Tensor, rank: int, l2: float,
                weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    mean, components, std = pca(x, rank)
    std = std.clamp_min(1e-12 * (1 + std.max()))
    z = (x.double() - mean) @ components.T / std
    w_z, b_z = fit_logistic_regression(z, y, l2=l2, sample_weight=weight)
    weight = components.T @ (w_z / std)
    return weight, b_z - weight @ mean


def split_held_out(groups: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Boolean mask of held-out samples, splitting by group (prompt) so no prompt is on both sides."""
    ids = torch.unique(groups)
    n_out = min(max(1, math.ceil(fraction * len(ids))), len(ids) - 1) if fraction > 0 else 0
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    return torch.isin(groups, ids[perm[:n_out]])


def fold_of(groups: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """The fold (0 .. folds - 1) of each sample, by group (prompt): the groups in a seeded random
    order dealt round-robin, so folds differ in size by at most one prompt."""
    ids, index = torch.unique(groups, return_inverse=True)
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    fold = torch.empty(len(ids), dtype=torch.long)
    fold[perm] = torch.arange(len(ids)) % folds
    return fold[index]


def _check_training_prompts(n_train: int, rank: int, how: str) -> None:
    if n_train < rank:
        raise ValueError(f"pca_rank={rank} needs at least {rank} training prompts, but only {n_train} remain after "
                         f"{how}; pass more prompts or a lower pca_rank")


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
    cv_folds: int = 0,
) -> Gate:
    """Fit on a split to measure held-out accuracy, then refit on every example [choice: with a
    few dozen prompts the extra quarter of the data is worth more than a gate that was never
    scored on exactly its own weights].

    `cv_folds >= 2` scores the gate by k-fold cross-validation over prompts instead of one split
    (`held_out_fraction` is then unused): every prompt is held out once, stratified by class, and
    the accuracy is the mean over folds, reported with its standard deviation. With 32 + 32
    prompts one 25 % split scores in steps of 1/16 on 16 prompts; 4 folds score on all 64."""
    sg = torch.arange(len(source)) if source_groups is None else source_groups
    cg = torch.arange(len(control)) if control_groups is None else control_groups
    if cv_folds >= 2:
        return _fit_cross_validated(source, control, sg, cg, rank, l2, cv_folds, seed)
    held_s = split_held_out(sg, held_out_fraction, seed)
    held_c = split_held_out(cg, held_out_fraction, seed + 1)
    n_train = len(torch.unique(sg[~held_s])) + len(torch.unique(cg[~held_c]))
    _check_training_prompts(n_train, rank, f"holding out {held_out_fraction:.0%} of {len(torch.unique(sg))} source "
                                           f"and {len(torch.unique(cg))} control prompts")
    x = torch.cat([source, control])
    y = torch.cat([torch.ones(len(source)), torch.zeros(len(control))])
    held = torch.cat([held_s, held_c])
    groups = torch.cat([sg, cg + sg.max() + 1])
    if held.any():
        w, b = _fit_folded(x[~held], y[~held], rank, l2, prompt_weights(groups[~held]))
        accuracy = _score(x[held], y[held], w, b, groups[held]).item()
    else:
        accuracy = float("nan")
    w, b = _fit_folded(x, y, rank, l2, prompt_weights(groups))
    return Gate(weight=w.float(), bias=b.float(), accuracy=accuracy)


def _fit_cross_validated(source, control, sg, cg, rank, l2, folds, seed) -> Gate:
    smallest = min(len(torch.unique(sg)), len(torch.unique(cg)))
    if folds > smallest:
        raise ValueError(f"cv_folds={folds} needs at least {folds} source and {folds} control prompts (each fold holds "
                         f"out prompts of both), got {smallest} in the smaller set; pass cv_folds={smallest} or fewer")
    x = torch.cat([source, control])
    y = torch.cat([torch.ones(len(source)), torch.zeros(len(control))])
    fold = torch.cat([fold_of(sg, folds, seed), fold_of(cg, folds, seed + 1)])
    groups = torch.cat([sg, cg + sg.max() + 1])
    scores = []
    for k in range(folds):
        held = fold == k
        _check_training_prompts(len(torch.unique(groups[~held])), rank, f"holding out fold {k + 1} of {folds}")
        w, b = _fit_folded(x[~held], y[~held], rank, l2, prompt_weights(groups[~held]))
        scores.append(_score(x[held], y[held], w, b, groups[held]))
    scores = torch.stack(scores)
    w, b = _fit_folded(x, y, rank, l2, prompt_weights(groups))
    return Gate(weight=w.float(), bias=b.float(), accuracy=scores.mean().item(), accuracy_std=scores.std().item())


register_gate("two_stage", fit_gate, "fitted after the maps: a PCA-regularised logistic regression of source vs "
              "control activations, scored on held-out prompts; layers below accuracy_threshold are not steered")
register_gate("e2e", None, "learned through the model together with the maps (core/learned.py): a Wasserstein "
              "term moves steered source towards target, an L2 term keeps steered control where it was")
