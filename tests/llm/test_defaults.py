"""The language-model defaults of `fit_steering` (issue 12, measured on SmolLM2-135M): causal gating,
pca_rank 16, a lambda floor of 0.9 that run time applies, and fitting on 32 tokens of the model's own
continuation of every text; end-to-end gates keep floor 0 (they are learned without one); an explicit
option wins; and with the defaults, strength 0 is still the model bit for bit."""

from __future__ import annotations

import pytest
import torch

from dsas_diffusion.llm import attach, fit_steering
from tests.llm.tiny_lms import (CONTROL, HELD_OUT_CONTROL, HELD_OUT_SOURCE, PROMPTS, SOURCE, TARGET, generate,
                                make_model, make_tokenizer, right_padded)

FAMILY = "llama"


def counted_fit(**options):
    """(the steering, max_new_tokens of every `generate` call the fit made). The continuations are cut to
    4 tokens: 32 take 15 s on this model and change nothing the tests read but the time."""
    model = make_model(FAMILY)
    calls, generate_ = [], model.generate

    def counting(*args, **kwargs):
        calls.append(kwargs["max_new_tokens"])
        return generate_(*args, **{**kwargs, "max_new_tokens": 4})

    model.generate = counting
    return fit_steering(model, make_tokenizer(), SOURCE, TARGET, CONTROL, progress=False, **options), calls


@pytest.fixture(scope="module")
def defaults():
    return counted_fit()


def test_a_default_fit_records_the_language_model_defaults_and_fits_on_continuations(defaults):
    steering, calls = defaults
    config = steering.config
    assert (config.gating, config.pca_rank, config.lambda_floor, config.gates) == ("causal", 16, 0.9, "two_stage")
    assert calls == [32] * 9  # source, target and control: 24 texts each, in batches of 8
    # the same fit on the texts alone: no generation, and other pooled statistics give other maps
    alone, calls = counted_fit(continuations=0, lambda_floor=0.5)
    assert calls == [] and alone.config.lambda_floor == 0.5 and alone.config.pca_rank == 16
    assert alone.layers == steering.layers
    for name in steering.layers:
        assert not torch.allclose(alone.maps[name].shift, steering.maps[name].shift)


def test_the_floor_is_applied_at_run_time_by_default(defaults):
    """Every lambda is 0 or at least 0.9: exactly the lambdas below 0.9 without the floor are 0 (one layer
    steered at a time, so that its input does not depend on the floor upstream)."""
    steering, tokenizer = defaults[0], make_tokenizer()
    model, enc = make_model(FAMILY), right_padded(tokenizer, HELD_OUT_SOURCE + HELD_OUT_CONTROL)
    mask, snapped, kept = enc["attention_mask"].bool(), 0, 0
    for name in steering.steered_layers:
        lam = {}
        for floor in (None, 0.0):  # None: the config's
            with attach(steering, model, layers=[name], lambda_floor=floor) as handle, torch.no_grad():
                model(**enc)
                lam[floor] = handle.scales[name][mask]
        assert torch.equal(lam[None] == 0, lam[0.0] < 0.9)
        assert torch.equal(lam[None][lam[None] > 0], lam[0.0][lam[0.0] >= 0.9])
        snapped, kept = snapped + int(((lam[0.0] > 0) & (lam[None] == 0)).sum()), kept + int((lam[None] > 0).sum())
    assert snapped and kept  # both cases occur


@pytest.mark.parametrize("options, floor", [({}, 0.0), ({"lambda_floor": 0.9}, 0.9)])
def test_end_to_end_gates_get_no_floor_unless_one_is_passed(options, floor):
    steering, _ = counted_fit(gates="e2e", continuations=0, training={"steps": 1}, **options)
    assert steering.config.gates == "e2e" and steering.config.lambda_floor == floor


def test_strength_zero_with_the_defaults_is_the_model_bit_for_bit(defaults):
    steering, tokenizer, model = defaults[0], make_tokenizer(), make_model(FAMILY)
    enc = right_padded(tokenizer, PROMPTS + HELD_OUT_CONTROL[:2])
    with torch.no_grad():
        logits = model(**enc).logits
    sequences, scores = generate(model, tokenizer, PROMPTS)
    with attach(steering, model, strength=0.0), torch.no_grad():
        assert torch.equal(model(**enc).logits, logits)
        steered = generate(model, tokenizer, PROMPTS)
    assert torch.equal(steered[0], sequences) and torch.equal(steered[1], scores)
