"""Differentiable steering hooks: the DSAS rule x' = x + lambda * (T(x) - x) with trainable tensors,
recording what the training losses of core/learned.py read.

The same rule as the run time (core/runtime.py) at strength 1, with the lambdas of the configured
gating mode, gate activation and first-token rule, so what is learned is what will run; but in
float32, without running state (training forwards are whole sequences) and without the
non-differentiable lambda floor.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import Gating, LayerKind
from .gate import activate
from .hooks import HookSet, PreForward, as_tokens, masked_mean
from .maps import SteeringMap


class LayerParameters(nn.Module):
    """One layer's trainable tensors: the affine map's (slope = weight - 1, bias), the gate's
    (weight, bias), or both. A fixed map or no gate is given instead of its tensors."""

    def __init__(self, width: int, fixed_map: SteeringMap | None, gate: tuple[torch.Tensor, torch.Tensor] | None):
        super().__init__()
        self.fixed_map = fixed_map
        if fixed_map is None:
            self.slope = nn.Parameter(torch.zeros(width))
            self.bias = nn.Parameter(torch.zeros(width))
        self.gated = gate is not None
        if gate is not None:
            self.gate_weight = nn.Parameter(gate[0].detach().float().clone())
            self.gate_bias = nn.Parameter(gate[1].detach().float().clone().reshape(()))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_map is None:
            return torch.addcmul(self.bias, self.slope, x)
        return self.fixed_map.delta(x)


def pooled_logits(proj: torch.Tensor, valid: torch.Tensor | None, gating: Gating, kind: LayerKind) -> torch.Tensor:
    """The logits (B, K) lambda reads in each gating mode, from per-position logits `proj` (B, K):
    `token` the position's own, `causal` the mean over real tokens so far, `sequence` (and any
    spatial layer) the mean over the real tokens of the row."""
    v = torch.ones_like(proj) if valid is None else valid.to(proj.dtype)
    if gating == "token" and kind != "spatial":
        return proj
    if gating == "causal" and kind != "spatial":
        return (proj * v).cumsum(1) / v.cumsum(1).clamp_min(1)
    return ((proj * v).sum(1, keepdim=True) / v.sum(1, keepdim=True).clamp_min(1)).expand_as(proj)


def first_token_mask(valid: torch.Tensor | None, b: int, k: int, device) -> torch.Tensor:
    """(B, K) True at each row's first real token and at padding before it, never steered at run time."""
    v = torch.ones(b, k, device=device) if valid is None else valid.to(device=device, dtype=torch.float32)
    seen = v.cumsum(1)
    return (seen == 0) | ((seen == 1) & (v > 0))


class TrainingHooks(HookSet):
    """Hooks steering `names` of `root` with `params[name]`. `steer=False` leaves outputs as they are
    (the unsteered reference); `record` chooses what each forward keeps per layer: `pooled`, the
    mask-aware mean over positions (B, D), or `tokens`, the outputs (B, K, D) with the valid mask."""

    def __init__(self, root: nn.Module, names: dict[str, str], params: dict[str, LayerParameters], *,
                 gating: Gating, kinds: dict[str, LayerKind], activation: str, skip_first_token: bool,
                 pre_forward: PreForward | None = None, what: str = "model"):
        super().__init__(root, list(names.values()), pre_forward, what)
        self.full = {local: full for full, local in names.items()}
        self.params, self.gating, self.kinds = params, gating, kinds
        self.activation, self.skip_first_token = activation, skip_first_token
        self.steer = True
        self.record = "pooled"
        self.outputs: dict[str, torch.Tensor] = {}
        self._attach()

    def lambdas(self, layer: LayerParameters, tokens: torch.Tensor, kind: LayerKind) -> torch.Tensor:
        """(B, K, 1) lambdas of a gated layer; 1 everywhere for an ungated one (plain steering)."""
        b, k = tokens.shape[:2]
        if not layer.gated:
            return tokens.new_ones(b, k, 1)
        proj = tokens @ layer.gate_weight + layer.gate_bias
        lam = activate(pooled_logits(proj, self.valid, self.gating, kind), self.activation)
        if self.skip_first_token and kind != "spatial":
            lam = lam.masked_fill(first_token_mask(self.valid, b, k, tokens.device), 0.0)
        return lam.unsqueeze(-1)

    def _on_output(self, name, x):
        full = self.full[name]
        tokens, restore = as_tokens(x)
        out = tokens.float()
        if self.steer:
            layer = self.params[full]
            out = out + self.lambdas(layer, out, self.kinds[full]) * layer.delta(out)
        if self.record == "pooled":
            self.outputs[full] = masked_mean(out, self.valid)
        else:
            self.outputs[full] = out
        return restore(out.to(x.dtype)) if self.steer else None
