"""Applying a fitted Steering: the DSAS rule x' = x + alpha * lambda * (T(x) - x) in forward hooks.

Per position the gate costs one dot product: the logit of a mean of activations is the mean of
the per-position logits (the gate is linear before the sigmoid), so the pooled modes only pool
the scalar projections, and a KV-cached token updates a running (sum, count) per row in O(1).
No host-device synchronisation and no Python loop over positions happen on this path.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import torch

from .config import Gating, LayerKind
from .gate import Gate
from .hooks import HookSet, PreForward, as_tokens
from .maps import SteeringMap

if TYPE_CHECKING:
    from .steering import Steering


def gate_lambdas(
    proj: torch.Tensor,
    *,
    gating: Gating,
    kind: LayerKind = "tokens",
    valid: torch.Tensor | None = None,
    skip_first: bool = False,
    floor: float = 0.0,
    prior: tuple[torch.Tensor, torch.Tensor] | None = None,
    starts: bool = True,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Lambdas (B, K) from gate logits `proj` (B, K) (bias included), and the updated running state.

    `prior` is the (sum of logits, count of real tokens) per row seen in earlier calls of the
    same sequence (KV cache); `valid` marks real tokens. Padding positions take the sequence
    decision in `token` mode; the first real token of a sequence is not steered if `skip_first`.
    `starts=False` says the call continues a sequence already under way (a cached decoding step):
    no first token or leading padding can be in it, which saves their masks on the hot path.
    """
    proj = proj.float()
    b = proj.shape[0]
    vf = None if valid is None else valid.to(proj.dtype)
    pv = proj if vf is None else proj * vf
    n = torch.full((b,), float(proj.shape[1]), device=proj.device) if vf is None else vf.sum(1)
    p_sum, p_cnt = prior if prior is not None else (proj.new_zeros(b), proj.new_zeros(b))
    tot, cnt = p_sum + pv.sum(1), p_cnt + n
    masks = starts and (skip_first or valid is not None)
    causal = gating == "causal" and kind != "spatial"
    # real tokens seen so far at each position, shared by the causal mean and the masks
    seen = p_cnt.unsqueeze(1) + (torch.ones_like(proj) if vf is None else vf).cumsum(1) if causal or masks else None
    if gating == "sequence" or (gating == "causal" and kind == "spatial"):
        logits = (tot / cnt.clamp_min(1)).unsqueeze(1).expand_as(proj)
    elif causal:
        logits = (p_sum.unsqueeze(1) + pv.cumsum(1)) / seen.clamp_min(1)
    elif valid is None:
        logits = proj
    else:  # padding positions take the sequence decision
        logits = torch.where(valid.bool(), proj, (tot / cnt.clamp_min(1)).unsqueeze(1))
    lam = torch.sigmoid(logits)
    if floor > 0:
        lam = torch.where(lam < floor, torch.zeros_like(lam), lam)
    if masks:
        if skip_first:  # the first real token of the sequence, if it is in this call
            first = seen == 1 if vf is None else (seen == 1) & (vf > 0)
            lam = lam.masked_fill(first, 0.0)
        lam = lam.masked_fill(seen == 0, 0.0)  # left padding before any real token
    return lam, (tot, cnt)


class _LayerRuntime:
    """One layer's map and gate, cast lazily to the device and dtype of its activations."""

    def __init__(self, map_: SteeringMap, gate: Gate, kind: LayerKind, steered: bool):
        self.map, self.gate, self.kind, self.steered = map_, gate, kind, steered
        self.width = map_.width
        self._cast: dict = {}

    def on(self, x: torch.Tensor) -> tuple[SteeringMap, torch.Tensor, torch.Tensor]:
        key = (x.device, x.dtype)
        if key not in self._cast:
            self._cast[key] = (self.map.to(x.device, x.dtype), self.gate.weight.to(x.device, x.dtype),
                               self.gate.bias.to(x.device, torch.float32))
        return self._cast[key]


class SteeringHandle(HookSet):
    """A Steering attached to one model. Use as a context manager or call `detach()`.

    `strength` (alpha) and `gated` can be changed between calls (strength 0: every hook returns at
    once; gated: layers whose gate failed the accuracy threshold are skipped, otherwise every
    hooked layer gets lambda = 1). `scales` holds the lambdas recorded so far; `reset()` clears
    them and any KV-cache running state for a new generation.
    """

    def __init__(
        self,
        steering: "Steering",
        root: torch.nn.Module,
        names: dict[str, str],
        *,
        strength: float = 1.0,
        gated: bool = True,
        gating: Gating | None = None,
        lambda_floor: float | None = None,
        skip_first_token: bool | None = None,
        record_scales: bool = True,
        pre_forward: PreForward | None = None,
        what: str = "model",
    ):
        super().__init__(root, list(names.values()), pre_forward, what)
        cfg = steering.config
        self.strength = float(strength)
        self.gated = gated
        self.gating = cfg.gating if gating is None else gating
        self.lambda_floor = cfg.lambda_floor if lambda_floor is None else lambda_floor
        self.skip_first_token = cfg.skip_first_token if skip_first_token is None else skip_first_token
        self.record_scales = record_scales
        self.track_running = False  # set by integrations whose calls continue a sequence (KV cache)
        self.continuing = False  # set per call by such integrations: this call extends a sequence
        self.running: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.history: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.layer_names = {local: full for full, local in names.items()}
        self._layers = {
            local: _LayerRuntime(steering.maps[full], steering.gates[full], cfg.layers[full].kind, cfg.layers[full].steered)
            for full, local in names.items()
        }
        self._attach()

    def detach(self):
        self.remove()

    def reset(self):
        self.history.clear()
        self.running.clear()
        self.valid = None
        self.rows = None

    @property
    def scales(self) -> dict[str, torch.Tensor]:
        """Recorded lambdas per layer: (B, tokens) for token layers (calls joined along tokens, as a
        cached generation produces them), (calls, B, positions) for spatial layers."""
        out = {}
        for local, chunks in self.history.items():
            full = self.layer_names[local]
            if self._layers[local].kind == "spatial":
                out[full] = torch.stack(chunks)
            else:
                out[full] = torch.cat(chunks, dim=1)
        return out

    def _on_output(self, name, x):
        layer = self._layers[name]
        if self.strength == 0 or (self.gated and not layer.steered):
            return None
        tokens, restore = as_tokens(x)
        if tokens.shape[-1] != layer.width:
            raise ValueError(
                f"layer {self.layer_names[name]!r} produces activations of width {tokens.shape[-1]}, but the steering "
                f"was fitted on width {layer.width}: it belongs to another model; fit it again on this one"
            )
        map_, weight, bias = layer.on(tokens)
        if self.gated:
            prior = self.running.get(name) if self.track_running else None
            lam, state = gate_lambdas(
                (tokens @ weight).float() + bias, gating=self.gating, kind=layer.kind, valid=self.valid,
                skip_first=self.skip_first_token, floor=self.lambda_floor, prior=prior,
                starts=not (self.track_running and self.continuing),
            )
            if self.track_running:
                self.running[name] = state
        else:  # plain steering: lambda = 1 everywhere
            lam = tokens.new_ones(tokens.shape[:2], dtype=torch.float32)
        if self.rows is not None:
            lam = lam * self.rows.to(lam.device, lam.dtype).unsqueeze(1)
        if self.record_scales:
            self.history[name].append(lam.detach())
        scale = (lam * self.strength).to(tokens.dtype).unsqueeze(-1)
        return restore(torch.addcmul(tokens, scale, map_.delta(tokens)))
