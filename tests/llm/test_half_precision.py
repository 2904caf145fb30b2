"""A language model in bfloat16 or float16 is an ordinary input: a steering fitted in float32 attaches to it
(the fingerprint survives the cast), its gate keeps float32 precision (its logits are computed in float32
whatever the model's dtype; issue 12 saw bfloat16 logits move lambdas by up to 0.16 on SmolLM2), strength 0 is the
model bit for bit, and fitting on the half-precision model itself works."""

from __future__ import annotations

import pytest
import torch

from dsas_diffusion.core import gate_lambdas
from dsas_diffusion.llm import attach, fit_steering
from tests.llm.tiny_lms import (CONTROL, HELD_OUT_CONTROL, HELD_OUT_SOURCE, PROMPTS, SOURCE, TARGET, TINY_FIT,
                                generate, make_model, right_padded)

HELD_OUT = HELD_OUT_SOURCE + HELD_OUT_CONTROL
# The largest |lambda(half model) - lambda(float32 model)| over real tokens of the held-out texts, on the four
# families at strength 1: measured 0.021 (bfloat16) and 0.0025 (float16). That is the models' own rounding of
# their activations, not the gate's arithmetic (the first test).
TOLERANCE = {torch.bfloat16: 0.05, torch.float16: 0.01}


@pytest.fixture(params=[torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def dtype(request):
    return request.param


def lambdas(steering, model, tokenizer, texts, strength=1.0) -> dict[str, torch.Tensor]:
    with attach(steering, model, strength=strength) as handle, torch.no_grad():
        model(**right_padded(tokenizer, texts))
        return handle.scales


def test_the_gate_runs_in_float32_on_a_half_precision_model(family, dtype, steering, tokenizer):
    """Lambdas equal the gate computed in float64 on the activations the half-precision layers produced:
    measured within 4e-7 on the four families, where a gate computed in the model's dtype is off by
    6e-4 to 1.3e-3 (float16) and 5e-3 to 1.1e-2 (bfloat16). One layer is steered at a time, so each
    layer's activations are those of the unsteered model."""
    model, config = make_model(family).to(dtype), steering.config
    inputs = right_padded(tokenizer, HELD_OUT)
    seen = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda module, args, out, n=n: seen.setdefault(n, out[0] if isinstance(out, (tuple, list)) else out))
        for n in steering.layers]
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    for name in steering.layers:
        x = seen[name]
        assert x.dtype == dtype
        with attach(steering, model, layers=[name]) as handle, torch.no_grad():
            model(**inputs)
            got = handle.scales[name]
        gate = steering.gates[name]
        proj = x.double() @ gate.weight.double() + gate.bias.double()
        expected, _ = gate_lambdas(proj, gating=config.gating, valid=inputs["attention_mask"],
                                   skip_first=config.skip_first_token, floor=config.lambda_floor,
                                   activation=config.gate_activation)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_lambdas_of_a_half_precision_model_stay_near_the_float32_models(family, dtype, steering, tokenizer):
    reference = lambdas(steering, make_model(family), tokenizer, HELD_OUT)
    got = lambdas(steering, make_model(family).to(dtype), tokenizer, HELD_OUT)
    real = right_padded(tokenizer, HELD_OUT)["attention_mask"].bool()
    deviation = max((got[k] - reference[k])[real].abs().max().item() for k in reference)
    assert deviation <= TOLERANCE[dtype]


def test_strength_0_is_the_half_precision_model_bit_for_bit(family, dtype, steering, tokenizer):
    model = make_model(family).to(dtype)
    plain = generate(model, tokenizer, PROMPTS)
    with attach(steering, model, strength=0.0):
        off = generate(model, tokenizer, PROMPTS)
    with attach(steering, model, strength=4.0):
        on = generate(model, tokenizer, PROMPTS)
    assert torch.equal(off[0], plain[0]) and torch.equal(off[1], plain[1])
    assert on[1].dtype == plain[1].dtype and not torch.equal(on[1], plain[1])


def held_out_accuracy(steering, model, tokenizer) -> dict[str, float]:
    """Per layer, the share of held-out texts whose last token's lambda (causal gating: it has read the whole
    text) is on the right side of 0.5."""
    last = right_padded(tokenizer, HELD_OUT)["attention_mask"].sum(1) - 1
    is_source = torch.arange(len(HELD_OUT)) < len(HELD_OUT_SOURCE)
    return {name: ((lam[torch.arange(len(HELD_OUT)), last] > 0.5) == is_source).float().mean().item()
            for name, lam in lambdas(steering, model, tokenizer, HELD_OUT).items()}


def test_fitting_on_a_half_precision_model_works_as_well_as_in_float32(family, dtype, steering, tokenizer):
    """Measured on the four families: the held-out accuracies of the two fits differ by at most 1 text in 32."""
    model = make_model(family).to(dtype)
    half = fit_steering(model, tokenizer, SOURCE, TARGET, CONTROL, **TINY_FIT)
    assert all(g.weight.dtype == torch.float32 for g in half.gates.values())
    expected = held_out_accuracy(steering, make_model(family), tokenizer)
    got = held_out_accuracy(half, model, tokenizer)
    assert got.keys() == expected.keys()
    assert all(abs(got[k] - expected[k]) <= 2 / len(HELD_OUT) for k in expected), (got, expected)
    # the fingerprint survives the cast: the steering attaches to the float32 model it was cast from
    attach(half, make_model(family)).detach()
