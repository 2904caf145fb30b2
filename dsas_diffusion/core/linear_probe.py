"""Small deterministic linear probes in plain torch: PCA and L2-regularised logistic regression.

scikit-learn is not a dependency; these are the two pieces of it DSAS needs, solved in float64
with L-BFGS so the same data always gives the same gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pca(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top `rank` principal axes of `x` (N, D): returns (mean (D,), components (rank, D), std (rank,))."""
    x = x.double()
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    std = s[:rank] / max(x.shape[0] - 1, 1) ** 0.5
    return mean, vh[:rank], std


def fit_logistic_regression(
    x: torch.Tensor, y: torch.Tensor, l2: float = 1.0, max_iter: int = 200, sample_weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary logistic regression; `l2` is the inverse of scikit-learn's C (penalty 0.5 * l2 * |w|^2),
    `sample_weight` (N,) scikit-learn's too (None: 1 each).

    Returns (weight (D,), bias ()), both float64. The penalty keeps separable data, the usual case
    with a few dozen prompts, from driving the weights to infinity.
    """
    x = x.double()
    y = y.double()
    sample_weight = None if sample_weight is None else sample_weight.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y, weight=sample_weight, reduction="sum") \
            + 0.5 * l2 * w.dot(w)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()
