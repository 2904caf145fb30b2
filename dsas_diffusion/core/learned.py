"""Learning steering through the model: LinEAS maps and end-to-end (E2E) DSAS gates.

Framework-free: an integration hands over `run(label, rows)`, which runs its model on those
examples of one set ("source" or "control") with its own batching and padding (a language model's
forward; a pipeline's `encode_prompt`, which runs all its text encoders), and the pooled unsteered
target activations it collected already. Hooks on the steered modules of every component apply the
DSAS rule with trainable tensors (core/training_hooks.py); every layer's map and gate is trained
jointly, so each layer learns on activations already steered by the layers before it.

The loss, summed over layers:
- Wasserstein (LinEAS): per unit, the squared 1-D Wasserstein-2 distance between the steered,
  token-averaged activations of a source batch and those of a target batch of the same size
  (both sorted), summed over units;
- control (E2E gates only): the mean over the steered positions of a control batch of
  ||steered - unsteered||^2, the unsteered reference from one pass of every control example without
  steering before training [choice: circuit breakers' L2 retain term; the paper's exact form is not public].
Adam (betas 0.9, 0.9), cosine decay to lr * 1e-3 (the authors' LinEAS settings), early stop when
the smoothed loss stops improving, and an optional sparse-group-lasso proximal step on each
layer's (weight - 1, bias), which switches whole layers off.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from .fit_inputs import positive_int, real_number
from .gate import Gate
from .hooks import PreForward
from .maps import LinEAS
from .steering import Steering
from .training_hooks import LayerParameters, Recording, TrainingHooks

Run = Callable[[str, Sequence[int]], None]


@dataclass(frozen=True)
class TrainingOptions:
    """How maps and gates are learned; each checked by name when built.

    - steps / lr: Adam steps and learning rate (authors: 1000, 1e-3), cosine-decayed to lr * 1e-3.
    - batch_size: examples of each set per step (authors: about 20; fewer if a set is smaller).
    - control_weight: weight of the control term against the Wasserstein term (E2E gates).
    - sparsity: strength s of the sparse group lasso s * (|theta|_1 + sqrt(2 D) |theta|_2) on each
      layer's theta = (weight - 1, bias), applied as a proximal step; 0 (default) leaves it off.
    - patience / min_improvement: stop when the exponentially smoothed loss has not fallen by
      min_improvement (relative) for `patience` steps.
    """

    steps: int = 1000
    lr: float = 1e-3
    batch_size: int = 20
    control_weight: float = 1.0
    sparsity: float = 0.0
    patience: int = 100
    min_improvement: float = 1e-3

    def __post_init__(self):
        for name in ("steps", "batch_size", "patience"):
            positive_int(name, getattr(self, name), f"; pass e.g. {name}={_DEFAULTS[name]}")
        real_number("lr", self.lr, 0.0, low_open=True, fix="; pass e.g. lr=1e-3")
        for name in ("control_weight", "sparsity", "min_improvement"):
            real_number(name, getattr(self, name), 0.0, fix=f"; pass e.g. {name}={_DEFAULTS[name]}")


_DEFAULTS = {"steps": 1000, "batch_size": 20, "patience": 100, "control_weight": 1.0, "sparsity": 0.0,
             "min_improvement": 1e-3}
TRAINING_OPTIONS = tuple(_DEFAULTS) + ("lr",)


def training_options(value) -> TrainingOptions:
    """`training=` of a fit: None (the defaults), a TrainingOptions, or a dict of its fields."""
    if value is None:
        return TrainingOptions()
    if isinstance(value, TrainingOptions):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"training must be a dict of training options such as {{'steps': 200}} (or a "
                        f"TrainingOptions), got {type(value).__name__}")
    unknown = sorted(set(value) - set(TRAINING_OPTIONS))
    if unknown:
        raise TypeError(f"training got unknown option(s) {unknown}; training options are {sorted(TRAINING_OPTIONS)}")
    return TrainingOptions(**value)


def wasserstein(steered: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over units of the squared 1-D Wasserstein-2 distance between two equal-size samples (N, D)."""
    return (steered.sort(0).values - target.sort(0).values).pow(2).mean(0).sum()


def relu_start(gate: Gate) -> tuple[torch.Tensor, torch.Tensor]:
    """A ReLU gate's starting point from a logistic one: the hard sigmoid clamp(z / 4 + 1/2, 0, 1)
    matches sigmoid(z) in slope at 0, so training starts from the two-stage decision with
    gradients for logits in (-2, 2) rather than from a gate saturated at 0 or 1."""
    return gate.weight / 4, gate.bias / 4 + 0.5


def train_steering(
    steering: Steering,
    model: nn.Module | dict[str, nn.Module],
    run: Run,
    sizes: dict[str, int],
    target: dict[str, torch.Tensor],
    options: TrainingOptions,
    *,
    pre_forward: PreForward | dict[str, PreForward | None] | None = None,
    skip_first_token: dict[str, bool] | None = None,
    progress: bool = True,
) -> tuple[Steering, list[float]]:
    """(the trained steering, the loss of each step). Learns the maps of a learned family (LinEAS:
    from the identity) and, for `config.gates == "e2e"`, the gates (from the two-stage ones the fit
    found); the rest stays as fitted. `sizes` are the numbers of source and control examples `run`
    takes rows of; `target` holds the target set's pooled activations per layer.

    `model` is the module whose layers are named in the steering, or several components
    {component: module} trained jointly (a pipeline's text encoders), whose layers are named
    "component.<module name>", with `pre_forward` then {component: its pre_forward} and
    `skip_first_token` {component: whether its first token is skipped} (default: the config's, for
    every component; a T5 encoder has no BOS to skip). The modules' weights are frozen and they run
    in eval mode while learning (both restored afterwards)."""
    config = steering.config
    learn_maps, learn_gates = isinstance(steering.maps[steering.layers[0]], LinEAS), config.gates == "e2e"
    if not (learn_maps or learn_gates):
        raise ValueError(f"method={config.method!r} with gates={config.gates!r} has nothing to learn through the "
                         "model; fit it from activations (fit_from_activations)")
    if options.sparsity > 0 and not learn_maps:
        raise ValueError(f"sparsity={options.sparsity} selects layers of learned maps (method='lineas'); "
                         f"method={config.method!r} learns none: drop sparsity")
    params = {}
    for name in steering.layers:
        gate, device = steering.gates[name], target[name].device
        start = None
        if learn_gates:
            start = relu_start(gate) if config.gate_activation == "relu" else (gate.weight, gate.bias)
        params[name] = LayerParameters(config.layers[name].width,
                                       None if learn_maps else steering.maps[name].to(device, torch.float32),
                                       start).to(device)
    trainable = [p for layer in params.values() for p in layer.parameters()]
    roots = model if isinstance(model, dict) else {"": model}
    pre = pre_forward if isinstance(pre_forward, dict) else {"": pre_forward}
    recording = Recording()
    kinds = {n: i.kind for n, i in config.layers.items()}
    with ExitStack() as stack:
        for component, root in roots.items():
            stack.enter_context(_frozen_eval(root))
            head = f"{component}." if component else ""
            names = {full: full[len(head):] for full in steering.layers if full.startswith(head)}
            stack.enter_context(TrainingHooks(
                root, names, params, recording=recording, gating=config.gating, kinds=kinds,
                activation=config.gate_activation,
                skip_first_token=(skip_first_token or {}).get(component, config.skip_first_token),
                pre_forward=pre.get(component), what=component or "model"))
        stack.enter_context(torch.enable_grad())
        losses = _optimise(recording, params, trainable, run, sizes, target, options, learn_gates, learn_maps,
                           config.seed, progress)
    record = {**asdict(options), "steps_run": len(losses), "final_loss": losses[-1]}
    return _trained(steering, params, learn_maps, learn_gates, record), losses


@contextmanager
def _frozen_eval(model: nn.Module):
    """The model's own weights out of autograd (only the steering's tensors are trained; the graph
    then keeps nothing for the weights' gradients) and dropout off; both restored afterwards."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    modes = [(m, m.training) for m in model.modules()]
    for p in trainable:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)
        for m, training in modes:
            m.training = training


def _optimise(rec: Recording, params: dict[str, LayerParameters], trainable: list[nn.Parameter], run: Run,
              sizes: dict[str, int], target: dict[str, torch.Tensor], options: TrainingOptions, learn_gates: bool,
              learn_maps: bool, seed: int, progress: bool) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    n_target = len(next(iter(target.values())))
    batch = min(options.batch_size, sizes["source"], n_target)
    control_batch = min(options.batch_size, sizes["control"])
    optimizer = torch.optim.Adam(trainable, lr=options.lr, betas=(0.9, 0.9))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, options.steps, eta_min=options.lr * 1e-3)
    losses, smooth, best, stalled = [], None, math.inf, 0
    control = learn_gates and options.control_weight > 0
    reference = _unsteered(rec, run, sizes["control"], control_batch) if control else None
    bar = tqdm(range(options.steps), desc="learning steering", leave=False, disable=not progress)
    for _ in bar:
        rows = torch.randperm(sizes["source"], generator=generator)[:batch].tolist()
        target_rows = torch.randperm(n_target, generator=generator)[:batch]
        rec.steer, rec.record = True, "pooled"
        run("source", rows)
        loss = sum(wasserstein(rec.outputs[n], target[n][target_rows.to(target[n].device)]) for n in params)
        if control:
            loss = loss + options.control_weight * _control_term(rec, run, params, reference, control_batch,
                                                                 generator)
        if not torch.isfinite(loss):
            raise ValueError(f"learning the steering diverged: the loss is {loss.item()} at step {len(losses) + 1}; "
                             f"pass a lower lr (training={{'lr': {options.lr / 10:g}}})")
        grads = torch.autograd.grad(loss, trainable)  # the model's own parameters get no .grad
        for p, g in zip(trainable, grads):
            p.grad = g
        optimizer.step()
        if learn_maps and options.sparsity > 0:
            _sparse_group_lasso(params, options.sparsity * optimizer.param_groups[0]["lr"])
        schedule.step()
        losses.append(loss.item())
        smooth = losses[-1] if smooth is None else 0.9 * smooth + 0.1 * losses[-1]
        bar.set_postfix(loss=f"{smooth:.4g}")
        if smooth < best * (1 - options.min_improvement):
            best, stalled = smooth, 0
        else:
            stalled += 1
            if stalled >= options.patience:
                break
    rec.outputs.clear(), rec.masks.clear()
    return losses


def _unsteered(rec: Recording, run: Run, n_control: int, batch: int) -> list[dict[str, torch.Tensor]]:
    """Per control example, {layer: its unsteered outputs (K, D)}, K its batch's padded width: one pass
    before training rather than an unsteered forward of every step's control batch (right padding keeps
    each example's real positions where they are, whatever batch it runs in)."""
    rec.steer, rec.record = False, "tokens"
    rows = []
    with torch.no_grad():
        for start in range(0, n_control, batch):
            chunk = list(range(start, min(start + batch, n_control)))
            run("control", chunk)
            rows += [{n: out[i] for n, out in rec.outputs.items()} for i in range(len(chunk))]
    rec.steer, rec.record = True, "pooled"
    return rows


def _control_term(rec: Recording, run: Run, params: dict, reference: list[dict[str, torch.Tensor]], batch: int,
                  generator: torch.Generator) -> torch.Tensor:
    """Per layer, the mean over the real tokens of a control batch of ||steered - unsteered||^2, summed."""
    rows = torch.randperm(len(reference), generator=generator)[:batch].tolist()
    rec.record = "tokens"
    run("control", rows)
    term = 0.0
    for n in params:
        out, mask = rec.outputs[n], rec.masks[n]
        ref = torch.stack([_width(reference[r][n], out.shape[1]) for r in rows])
        v = torch.ones(ref.shape[:2], device=ref.device) if mask is None else mask.to(ref.device).float()
        v = v.unsqueeze(-1)
        term = term + torch.where(v > 0, (out - ref).pow(2), 0.0).sum() / v.sum().clamp_min(1)  # NaN at padding stays out
    rec.record = "pooled"
    return term


def _width(x: torch.Tensor, k: int) -> torch.Tensor:
    """(K, D) cut or zero-padded to k positions (what lies past a text's end is masked out)."""
    return x[:k] if len(x) >= k else torch.cat([x, x.new_zeros(k - len(x), *x.shape[1:])])


@torch.no_grad()
def _sparse_group_lasso(params: dict[str, LayerParameters], step: float) -> None:
    """The proximal map of step * (|theta|_1 + sqrt(len theta) |theta|_2) on each layer's theta = (slope, bias):
    soft-thresholding, then shrinking the layer as a group (to exactly zero, the identity, when small)."""
    for layer in params.values():
        theta = torch.cat([layer.slope, layer.bias])
        theta = theta.sign() * (theta.abs() - step).clamp_min(0)
        norm = theta.norm()
        shrink = (1 - step * math.sqrt(theta.numel()) / norm).clamp_min(0) if norm > 0 else norm
        theta = theta * shrink
        d = layer.slope.numel()
        layer.slope.copy_(theta[:d])
        layer.bias.copy_(theta[d:])


def _trained(steering: Steering, params: dict[str, LayerParameters], learn_maps: bool, learn_gates: bool,
             record: dict) -> Steering:
    config = steering.config
    maps, gates, layers = dict(steering.maps), dict(steering.gates), dict(config.layers)
    for name, layer in params.items():
        if learn_maps:
            maps[name] = LinEAS(weight=(1 + layer.slope).detach().float().cpu(), bias=layer.bias.detach().float().cpu())
        if learn_gates:
            # not a classifier scored on held-out prompts: every layer is steered, and the gate decides
            gates[name] = Gate(weight=layer.gate_weight.detach().float().cpu(),
                               bias=layer.gate_bias.detach().float().cpu(), accuracy=float("nan"))
            layers[name] = replace(layers[name], gate_accuracy=float("nan"), steered=True)
    return Steering(replace(config, layers=layers, training=record), maps, gates, steering.probes)
