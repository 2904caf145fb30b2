"""The gate: PCA + logistic regression folded into one linear map, and the lambda rules."""

import pytest
import torch

from dsas_diffusion.core import fit_gate, gate_lambdas
from dsas_diffusion.core.gate import _fit_folded, split_held_out
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
    seq = torch.sigmoid(torch.tensor(7.0 / 3))
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
