"""Learning through the model (core/learned.py) on synthetic activations: LinEAS recovers a known
per-unit affine map, E2E gates keep control activations where they were while moving source ones,
the sparse group lasso switches a useless layer off, and bad options are refused by name."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from dsas_diffusion import SteeringConfig
from dsas_diffusion.core import ActivationCapture, fit_from_activations
from dsas_diffusion.core.gate import Gate, activate
from dsas_diffusion.core.learned import TrainingOptions, relu_start, train_steering, training_options, wasserstein
from dsas_diffusion.core.maps import LinearAcT, LinEAS


class Pass(nn.Module):
    def forward(self, x):
        return x


class Stack(nn.Module):
    """Two hooked layers; the second reads what the first (steered) produced, through a fixed linear map."""

    def __init__(self, d: int, blind: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.mix, self.second = Pass(), nn.Linear(d, d), Pass()
        if blind:  # the second layer never sees unit 0, where the concept is: it has nothing to steer
            with torch.no_grad():
                self.mix.weight[:, 0] = 0

    def forward(self, x):
        return self.second(self.mix(self.first(x)))


def sets(d=8, n=64, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(n, k, d, generator=g)
    source[..., 0] += 4.0  # the concept, on unit 0
    control = torch.randn(n, k, d, generator=g)
    target = torch.randn(n, k, d, generator=g)
    return {"source": source, "target": target, "control": control}


def pooled(model, names, x):
    with ActivationCapture(model, names) as cap, torch.no_grad():
        model(x)
    return cap.collect()


def fit(model, names, data, options, **config):
    acts = {label: pooled(model, names, x) for label, x in data.items()}
    config = SteeringConfig(skip_first_token=False, gating="sequence", **config)

    def run(label, rows):
        model(data[label][rows])

    train = partial(_train, model=model, run=run, sizes={k: len(v) for k, v in data.items()}, target=acts["target"],
                    options=options)
    learned = config.gates == "e2e" or config.method == "lineas"
    return fit_from_activations(acts["source"], acts["target"], acts["control"], config,
                                refine=train if learned else None, progress=False, require_steered=False), acts


def _train(steering, *, model, run, sizes, target, options):
    return train_steering(steering, model, run, sizes, target, options, progress=False)[0]


def test_lineas_recovers_a_known_per_unit_affine_map_from_unpaired_samples():
    d = 6
    model = nn.Sequential()
    model.add_module("layer", Pass())
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.linspace(0.5, 2.0, d), torch.linspace(-1.0, 1.0, d)
    n = 1000
    source = torch.randn(n, 1, d, generator=g)
    target = torch.randn(n, 1, d, generator=g) * weight + bias  # another sample: no pairs to lean on
    data = {"source": source, "target": target, "control": torch.randn(n, 1, d, generator=g) + 3}
    steering, _ = fit(model, ["layer"], data, TrainingOptions(steps=600, lr=2e-2, batch_size=n), method="lineas",
                      pca_rank=2)
    m = steering.maps["layer"]
    assert isinstance(m, LinEAS)
    torch.testing.assert_close(m.weight, weight, atol=0.1, rtol=0)
    torch.testing.assert_close(m.bias, bias, atol=0.1, rtol=0)
    # on the full sample the loss is least squares on sorted pairs: its optimum is Linear-AcT's closed form
    act = LinearAcT.fit(source[:, 0], target[:, 0], clamp_to_source_range=False)
    torch.testing.assert_close(m.weight, act.beta, atol=0.02, rtol=0)
    torch.testing.assert_close(m.bias, act.alpha, atol=0.02, rtol=0)


def test_lineas_trains_layers_jointly_and_lowers_the_wasserstein_loss():
    data = sets()
    model, names = Stack(8), ["first", "second"]
    options = TrainingOptions(steps=150, lr=1e-2, batch_size=32)
    steering, acts = fit(model, names, data, options, method="lineas", pca_rank=2)
    with steering.attach(model, gated=False, check_model=False):
        steered = pooled(model, names, data["source"])
    for n in names:
        before = wasserstein(acts["source"][n], acts["target"][n])
        after = wasserstein(steered[n], acts["target"][n])
        assert after < 0.2 * before, (n, before, after)


def run_gated(model: Stack, steering, x, activation: str, steer: bool = True) -> dict[str, torch.Tensor]:
    """Pooled outputs of both layers, steered with the lambdas of the sequence gating mode computed
    here with the gate activation under test (a reference written out, not the library's run time)."""
    out, h = {}, x
    with torch.no_grad():
        for n in ("first", "second"):
            h = model.mix(h) if n == "second" else h
            if steer:
                gate, m = steering.gates[n], steering.maps[n]
                lam = activate((h @ gate.weight + gate.bias).mean(1, keepdim=True), activation).unsqueeze(-1)
                h = h + lam * m.delta(h)
            out[n] = h.mean(1)
    return out


def control_drift(model, steering, x, activation) -> float:
    steered, reference = run_gated(model, steering, x, activation), run_gated(model, steering, x, activation, False)
    return max(((steered[n] - reference[n]).norm(dim=1).mean() / reference[n].norm(dim=1).mean()).item()
               for n in steered)


@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
def test_e2e_gates_keep_control_activations_while_moving_source_ones(activation):
    data = sets()
    model, names = Stack(8), ["first", "second"]
    options = TrainingOptions(steps=300, lr=3e-2, batch_size=32)
    kw = dict(method="mean_shift", gate_activation=activation, pca_rank=2)
    steering, acts = fit(model, names, data, options, gates="e2e", **kw)
    start, _ = fit(model, names, data, options, **kw)  # training starts from the two-stage gates
    if activation == "relu":
        start.gates = {n: Gate(*relu_start(g), accuracy=g.accuracy) for n, g in start.gates.items()}
    assert steering.config.gates == "e2e" and all(info.steered for info in steering.config.layers.values())
    drift, before = control_drift(model, steering, data["control"], activation), \
        control_drift(model, start, data["control"], activation)
    assert drift < 0.05 and drift < 0.5 * before
    steered = run_gated(model, steering, data["source"], activation)
    for n in names:
        assert wasserstein(steered[n], acts["target"][n]) < 0.3 * wasserstein(acts["source"][n], acts["target"][n])


def test_sparse_group_lasso_switches_off_a_layer_with_nothing_to_do():
    data = sets()
    model, names = Stack(8, blind=True), ["first", "second"]
    maps = {}
    for sparsity in (0.0, 0.3):
        options = TrainingOptions(steps=200, lr=1e-2, batch_size=32, sparsity=sparsity)
        maps[sparsity] = fit(model, names, data, options, method="lineas", pca_rank=2)[0].maps
    # without the penalty the second layer fits noise; with it, it is exactly the identity
    assert not torch.equal(maps[0.0]["second"].bias, torch.zeros(8))
    assert torch.equal(maps[0.3]["second"].weight, torch.ones(8)) and torch.equal(maps[0.3]["second"].bias,
                                                                                 torch.zeros(8))
    assert maps[0.3]["first"].bias[0] < -0.1  # the first still moves unit 0 (+4 in source) towards target


def test_sparsity_without_learned_maps_is_refused():
    data = sets()
    model = Stack(8)
    with pytest.raises(ValueError, match=r"sparsity=0.1 selects layers of learned maps.*drop sparsity"):
        fit(model, ["first"], data, TrainingOptions(steps=2, sparsity=0.1), method="mean_shift", gates="e2e",
            pca_rank=2)


def test_learned_steering_without_a_model_is_refused_naming_the_fix():
    data = sets()
    model, names = Stack(8), ["first"]
    acts = {label: pooled(model, names, x) for label, x in data.items()}
    for config in (SteeringConfig(method="lineas"), SteeringConfig(method="mean_shift", gates="e2e")):
        with pytest.raises(ValueError, match="learned through the model.*llm.fit_steering"):
            fit_from_activations(acts["source"], acts["target"], acts["control"], config, progress=False)


@pytest.mark.parametrize("value, error, message", [
    ({"steps": 0}, ValueError, r"steps must be a positive integer, got 0; pass e.g. steps=1000"),
    ({"lr": -1.0}, ValueError, r"lr must be a finite number > 0, got -1.0; pass e.g. lr=1e-3"),
    ({"sparsity": float("nan")}, ValueError, r"sparsity must be a finite number >= 0"),
    ({"batch_size": 2.5}, TypeError, r"batch_size must be a positive integer"),
    ({"stepz": 3}, TypeError, r"training got unknown option\(s\) \['stepz'\]; training options are"),
    ([("steps", 3)], TypeError, r"training must be a dict of training options"),
])
def test_bad_training_options_are_refused_by_name(value, error, message):
    with pytest.raises(error, match=message):
        training_options(value)


def test_learning_is_deterministic_with_a_seed_and_stops_when_the_loss_stalls():
    data = sets()
    model, names = Stack(8), ["first", "second"]
    options = TrainingOptions(steps=400, lr=1e-2, batch_size=16, patience=10, min_improvement=0.05)
    a, b = (fit(model, names, data, options, method="lineas", pca_rank=2)[0] for _ in range(2))
    c = fit(model, names, data, options, method="lineas", pca_rank=2, seed=1)[0]
    assert all(torch.equal(a.maps[n].weight, b.maps[n].weight) and torch.equal(a.maps[n].bias, b.maps[n].bias)
               for n in names)
    assert not torch.equal(a.maps["first"].bias, c.maps["first"].bias)
    acts = {label: pooled(model, names, x) for label, x in data.items()}
    steering = fit_from_activations(acts["source"], acts["target"], acts["control"],
                                    SteeringConfig(method="lineas", pca_rank=2), progress=False, require_steered=False,
                                    refine=lambda s: s)  # the untrained start: the identity
    _, losses = train_steering(steering, model, lambda label, rows: model(data[label][rows]),
                               {"source": 64, "control": 64}, acts["target"], options, progress=False)
    assert len(losses) < 400 and losses[-1] < 0.5 * losses[0]


def test_the_unsteered_control_reference_is_one_pass_before_training_not_one_forward_per_step():
    data = sets()
    model, names = Stack(8), ["first", "second"]
    acts = {label: pooled(model, names, x) for label, x in data.items()}
    steering = fit_from_activations(acts["source"], acts["target"], acts["control"],
                                    SteeringConfig(method="mean_shift", gates="e2e", pca_rank=2, gating="sequence",
                                                   skip_first_token=False), progress=False, require_steered=False,
                                    refine=lambda s: s)
    calls = []

    def run(label, rows):
        calls.append((label, torch.is_grad_enabled(), len(rows)))
        model(data[label][rows])

    options = TrainingOptions(steps=6, lr=1e-2, batch_size=16)
    train_steering(steering, model, run, {"source": 64, "control": 64}, acts["target"], options, progress=False)
    unsteered = [n for label, grad, n in calls if label == "control" and not grad]
    assert unsteered == [16] * 4  # every control example once, in batches, before the first step
    assert [n for label, grad, n in calls if label == "control" and grad] == [16] * 6


@pytest.mark.parametrize("gating", ["token", "causal", "sequence"])
def test_training_lambdas_are_the_run_time_lambdas_at_every_real_token(gating):
    """What is learned is what runs: the training hooks' lambdas (sigmoid) equal core/runtime.py's."""
    from dsas_diffusion.core.hooks import steered_positions
    from dsas_diffusion.core.runtime import gate_lambdas
    from dsas_diffusion.core.training_hooks import first_token_mask, pooled_logits

    g = torch.Generator().manual_seed(0)
    proj = torch.randn(3, 6, generator=g) * 3
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    run_time, _ = gate_lambdas(proj, gating=gating, valid=valid, skip_first=True)
    counted = steered_positions(valid, 3, 6, "cpu", True)  # the first token is neither steered nor counted
    training = activate(pooled_logits(proj, counted, gating, "tokens"), "sigmoid").masked_fill(
        first_token_mask(valid, 3, 6, "cpu"), 0.0)
    torch.testing.assert_close(training[valid], run_time[valid])
