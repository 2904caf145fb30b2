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
from .hooks import HookSet, PreForward, as_tokens, masked_mean, steered_positions
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
    pv = proj if valid is None else torch.where(v > 0, proj, 0.0)  # selected: a NaN logit of padding stays out
    if gating == "causal" and kind != "spatial":
        return pv.cumsum(1) / v.cumsum(1).clamp_min(1)
    return (pv.sum(1, keepdim=True) / v.sum(1, keepdim=True).clamp_min(1)).expand_as(proj)


def first_token_mask(valid: torch.Tensor | None, b: int, k: int, device) -> torch.Tensor:
    """(B, K) True at each row's first real token and at padding before it, never steered at run time."""
    v = torch.ones(b, k, device=device) if valid is None else valid.to(device=device, dtype=torch.float32)
    seen = v.cumsum(1)
    return (seen == 0) | ((seen == 1) & (v > 0))


class Recording:
    """What the training hooks of every steered component do in the current forward and what they
    kept, shared by the hook sets of several components (a pipeline's text encoders). `steer=False`
    leaves outputs as they are (the unsteered reference); `record` chooses what each forward keeps
    per layer in `outputs`: `pooled`, the mask-aware mean over positions (B, D), or `tokens`, the
    outputs (B, K, D), with the mask (B, K) of the positions read in `masks` (None: all). Both read
    the positions run time steers (core/hooks.py `steered_positions`), as fitting does."""

    def __init__(self):
        self.steer = True
        self.record = "pooled"
        self.outputs: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor | None] = {}


class TrainingHooks(HookSet):
    """Hooks steering `names` ({full layer name: module name in `root`}) of `root` with
    `params[full name]`, doing and keeping what `recording` says."""

    first = True  # before any other forward hook, as at run time (see HookSet.first)

    def __init__(self, root: nn.Module, names: dict[str, str], params: dict[str, LayerParameters], *,
                 recording: Recording, gating: Gating, kinds: dict[str, LayerKind], activation: str,
                 skip_first_token: bool, pre_forward: PreForward | None = None, what: str = "model"):
        super().__init__(root, list(names.values()), pre_forward, what)
        self.full = {local: full for full, local in names.items()}
        self.params, self.recording, self.gating, self.kinds = params, recording, gating, kinds
        self.activation, self.skip_first_token = activation, skip_first_token
        self._attach()

    def lambdas(self, layer: LayerParameters, tokens: torch.Tensor, kind: LayerKind) -> torch.Tensor:
        """(B, K, 1) lambdas of a gated layer; 1 everywhere for an ungated one (plain steering)."""
        b, k = tokens.shape[:2]
        if not layer.gated:
            return tokens.new_ones(b, k, 1)
        proj = tokens @ layer.gate_weight + layer.gate_bias
        skip = self.skip_first_token and kind != "spatial"
        counted = steered_positions(self.valid, b, k, tokens.device, skip)  # what run time's means count
        lam = activate(pooled_logits(proj, counted, self.gating, kind), self.activation)
        if skip:
            lam = lam.masked_fill(first_token_mask(self.valid, b, k, tokens.device), 0.0)
        return lam.unsqueeze(-1)

    def _on_output(self, name, x):
        full, rec = self.full[name], self.recording
        tokens, restore = as_tokens(x)
        out = tokens.float()
        if rec.steer:
            layer = self.params[full]
            out = out + self.lambdas(layer, out, self.kinds[full]) * layer.delta(out)
        # the positions fitting reads: those run time steers (the first token excluded where it is skipped)
        read = steered_positions(self.valid, *out.shape[:2], out.device,
                                 self.skip_first_token and self.kinds[full] != "spatial")
        if rec.record == "pooled":
            rec.outputs[full] = masked_mean(out, read)
        else:
            rec.outputs[full], rec.masks[full] = out, read
        return restore(out.to(x.dtype)) if rec.steer else None
