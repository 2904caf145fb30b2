"""The gate: PCA + logistic regression folded into one linear map, and the lambda rules."""

import pytest
import torch

from dsas_diffusion.core import fit_gate, gate_lambdas
from dsas_diffusion.core.gate import _fit_folded, prompt_weights, split_held_out
from dsas_diffusion.core.linear_probe import fit_logistic_regression, pca


def data(n=40, d=24, shift=5.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, d, generator=g)
    s = torch.randn(n, d, generator=g)
    s[:, 0] += shift
    return s, c


def test_gate_separates_and_scores_on_held_out_prompts():
    s, c = data()
    gate = fit_gate(s, c, rank=5)
    assert gate.accuracy >= 0.9
    s2, c2 = data(seed=1)
    assert torch.sigmoid(gate.logits(s2)).mean() > 0.8
    assert torch.sigmoid(gate.logits(c2)).mean() < 0.2


def test_folded_gate_equals_pca_then_logistic():
    s, c = data()
    x = torch.cat([s, c])
    y = torch.cat([torch.ones(len(s)), torch.zeros(len(c))])
    w, b = _fit_folded(x, y, 5, 1.0)
    mean, comps, std = pca(x, 5)
    wz, bz = fit_logistic_regression((x.double() - mean) @ comps.T / std, y)
    explicit = ((x.double() - mean) @ comps.T / std) @ wz + bz
    torch.testing.assert_close(x.double() @ w + b, explicit)


def test_held_out_split_never_puts_one_prompt_on_both_sides():
    groups = torch.arange(10).repeat_interleave(4)  # 10 prompts x 4 denoising steps
    held = split_held_out(groups, 0.25, seed=0)
    for gid in range(10):
        assert held[groups == gid].all() or not held[groups == gid].any()
    assert held.view(10, 4)[:, 0].sum() == 3


def test_fewer_prompts_than_pca_components_is_refused():
    s, c = data(n=3)
    with pytest.raises(ValueError, match="pca_rank=5 needs at least 5 training prompts.*lower pca_rank"):
        fit_gate(s, c, rank=5)


def test_token_mode_padding_takes_the_sequence_decision_and_first_token_is_skipped():
    proj = torch.tensor([[5.0, -1.0, 3.0, 9.0, 9.0]])
    valid = torch.tensor([[True, True, True, False, False]])
    lam, _ = gate_lambdas(proj, gating="token", valid=valid, skip_first=True)
    seq = torch.sigmoid(torch.tensor(2.0 / 2))  # the skipped first token is not counted in the mean either
    torch.testing.assert_close(lam, torch.stack([torch.tensor(0.0), torch.sigmoid(torch.tensor(-1.0)),
                                                 torch.sigmoid(torch.tensor(3.0)), seq, seq]).unsqueeze(0))


def test_causal_and_sequence_modes():
    proj = torch.tensor([[1.0, 3.0, -4.0]])
    lam, _ = gate_lambdas(proj, gating="causal")
    torch.testing.assert_close(lam, torch.sigmoid(torch.tensor([[1.0, 2.0, 0.0]])))
    lam, _ = gate_lambdas(proj, gating="sequence")
    torch.testing.assert_close(lam, torch.sigmoid(torch.tensor([[0.0, 0.0, 0.0]])))
    lam, _ = gate_lambdas(proj, gating="causal", kind="spatial")  # images: causal is the spatial mean
    torch.testing.assert_close(lam, torch.sigmoid(torch.zeros(1, 3)))


@pytest.mark.parametrize("gating", ["token", "causal", "sequence"])
def test_running_state_gives_the_same_lambdas_as_one_pass(gating):
    """A KV-cached token continues the sequence in O(1): same lambdas as the whole prefix at once."""
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(3, 7, generator=g)
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[0, :2] = False  # left padding
    full, _ = gate_lambdas(proj, gating=gating, valid=valid, skip_first=True)
    lam, state = gate_lambdas(proj[:, :5], gating=gating, valid=valid[:, :5], skip_first=True)
    parts = [lam]
    for k in (5, 6):
        lam, state = gate_lambdas(proj[:, k:k + 1], gating=gating, valid=valid[:, k:k + 1], skip_first=True, prior=state)
        parts.append(lam)
    if gating == "sequence":  # a sequence decision can only see the prefix so far: compare the last token
        torch.testing.assert_close(parts[-1][:, 0], full[:, -1])
    else:
        torch.testing.assert_close(torch.cat(parts, 1), full)
    assert (full[0, :2] == 0).all()  # left padding is never steered


def test_floor_snaps_small_lambdas_to_exact_zero():
    lam, _ = gate_lambdas(torch.tensor([[-6.0, 0.0, 6.0]]), gating="token", floor=0.05)
    assert lam[0, 0] == 0 and lam[0, 1] == 0.5


def test_gates_are_fitted_on_the_gate_sets_when_given():
    """Conditional steering: the map from source -> target, the gate from gate_source vs gate_control."""
    from dsas_diffusion import SteeringConfig
    from dsas_diffusion.core import fit_from_activations

    g = torch.Generator().manual_seed(0)
    s, t, c, gc = (torch.randn(40, 8, generator=g) for _ in range(4))
    s[:, 0] += 5  # the map's concept lives on unit 0 ...
    gs = torch.randn(40, 8, generator=g)
    gs[:, 1] += 5  # ... the gate's on unit 1
    layer = lambda x: {"l": x}  # noqa: E731
    steering = fit_from_activations(layer(s), layer(t), layer(c), SteeringConfig(method="mean_shift"),
                                    gate_source=layer(gs), gate_control=layer(gc), progress=False)
    gate = steering.gates["l"]
    assert gate.accuracy >= 0.9 and gate.weight[1].abs() > 5 * gate.weight[0].abs()
    torch.testing.assert_close(steering.maps["l"].shift, (t.double().mean(0) - s.double().mean(0)).float())
    with pytest.raises(ValueError, match=r"gate_control activations are for layers \['m'\]"):
        fit_from_activations(layer(s), layer(t), layer(c), SteeringConfig(method="mean_shift"),
                             gate_source=layer(gs), gate_control={"m": gc}, progress=False)


def test_cross_validation_holds_out_every_prompt_once_and_reports_the_spread():
    from dsas_diffusion.core.gate import fold_of

    groups = torch.arange(10).repeat_interleave(3)  # 10 prompts x 3 rows each
    fold = fold_of(groups, 4, seed=0)
    assert all(len(torch.unique(fold[groups == g])) == 1 for g in range(10))  # a prompt stays in one fold
    assert sorted(torch.bincount(fold).tolist()) == [6, 6, 9, 9]  # 10 prompts dealt to 4 folds: 2, 2, 3, 3
    s, c = data(n=40, shift=1.0)
    gate = fit_gate(s, c, rank=5, cv_folds=4)
    # the oracle: the same folds scored by hand
    x, y = torch.cat([s, c]), torch.cat([torch.ones(40), torch.zeros(40)])
    folds = torch.cat([fold_of(torch.arange(40), 4, 0), fold_of(torch.arange(40), 4, 1)])
    scores = []
    for k in range(4):
        w, b = _fit_folded(x[folds != k], y[folds != k], 5, 1.0)
        scores.append(((x[folds == k].double() @ w + b > 0).double() == y[folds == k]).double().mean())
    scores = torch.stack(scores)
    assert gate.accuracy == scores.mean().item() and gate.accuracy_std == scores.std().item() > 0
    torch.testing.assert_close(gate.weight, fit_gate(s, c, rank=5).weight)  # deployed: refitted on everything
    with pytest.raises(ValueError, match="cv_folds=41 needs at least 41 source and 41 control prompts"):
        fit_gate(s, c, rank=5, cv_folds=41)


def test_cross_validated_accuracy_and_spread_are_saved_per_layer(tmp_path):
    from dsas_diffusion import Steering
    from tests.core.test_steering import Tiny, fitted

    steering = fitted(Tiny(), cv_folds=5)[0]
    assert steering.config.cv_folds == 5
    assert all(0 <= info.gate_accuracy_std <= 0.5 for info in steering.config.layers.values())  # not NaN
    steering.save_pretrained(tmp_path)
    loaded = Steering.from_pretrained(tmp_path)
    assert {n: (i.gate_accuracy, i.gate_accuracy_std) for n, i in loaded.config.layers.items()} == \
        {n: (i.gate_accuracy, i.gate_accuracy_std) for n, i in steering.config.layers.items()}


def test_accuracy_scaling_weighs_each_map_by_its_gate_accuracy_instead_of_a_threshold():
    from dsas_diffusion import SteeringConfig
    from dsas_diffusion.core import fit_from_activations
    from dsas_diffusion.core.fit import accuracy_weight

    g = torch.Generator().manual_seed(0)
    s, t, c = (torch.randn(40, 8, generator=g) for _ in range(3))
    acts = [{"clear": x.clone(), "weak": x.clone(), "noise": x.clone()} for x in (s, t, c)]
    acts[0]["clear"][:, 0] += 5
    acts[0]["weak"][:, 0] += 0.7
    fits = {flag: fit_from_activations(*acts, SteeringConfig(method="linear_act", accuracy_scaling=flag),
                                       progress=False) for flag in (False, True)}
    layers = fits[True].config.layers
    assert 0.5 < layers["weak"].gate_accuracy < 1 and layers["clear"].gate_accuracy == 1
    assert [n for n in fits[True].layers if layers[n].steered] == [n for n in fits[True].layers
                                                                   if layers[n].gate_accuracy > 0.5]
    x = torch.randn(3, 8, generator=g)
    for name in ("clear", "weak"):
        weight = accuracy_weight(layers[name].gate_accuracy)
        torch.testing.assert_close(fits[True].maps[name].delta(x), weight * fits[False].maps[name].delta(x))
    assert fits[True].maps["clear"] is not None and torch.equal(fits[True].maps["clear"].beta,
                                                                 fits[False].maps["clear"].beta)
    assert [accuracy_weight(a) for a in (0.3, 0.5, 0.75, 1.0, float("nan"))] == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_each_prompt_weighs_the_same_however_many_rows_it_gives():
    """Causal-gate fitting gives a control text a row per position read and a source text fewer: unweighted,
    the logistic loss would lean towards the class with more rows and bias the gate against the source."""
    g = torch.Generator().manual_seed(0)
    n, d, rows = 24, 16, 8
    s = torch.randn(n, d, generator=g)
    s[:, 0] += 1.5
    c = torch.randn(n * rows, d, generator=g)  # 8 rows per control prompt
    cg = torch.arange(n).repeat_interleave(rows)
    gate = fit_gate(s, c, rank=4, control_groups=cg, held_out_fraction=0)
    p_source = torch.sigmoid(gate.logits(s)).mean()
    p_control = 1 - torch.sigmoid(gate.logits(c)).mean()
    assert abs(p_source - p_control) < 0.03  # balanced: as sure of one class as of the other
    assert prompt_weights(torch.arange(5).repeat_interleave(3)) is None  # equal counts: unweighted, as before
    w = prompt_weights(torch.tensor([0, 1, 1, 1]))
    torch.testing.assert_close(w, torch.tensor([2.0, 2 / 3, 2 / 3, 2 / 3], dtype=torch.float64))
