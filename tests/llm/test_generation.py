"""Steering a causal LM while it generates: remove == never attached, strength 0 == baseline, the KV
cache changes nothing, and a row's result never depends on the rest of its batch."""

from __future__ import annotations

import pytest
import torch

from dsas_diffusion.llm import attach
from tests.llm.tiny_lms import PROMPTS, fitted, generate, make_model, right_padded

STRENGTH = 2.0  # well above 1, so a wrong lambda anywhere shows in the tokens, not just in the logits


def _no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_strength_zero_and_detach_are_bit_identical(model, tokenizer, steering):
    tokens, logits = generate(model, tokenizer, PROMPTS)
    with attach(steering, model, strength=0.0):
        zero = generate(model, tokenizer, PROMPTS)
    handle = attach(steering, model, strength=STRENGTH)
    steered = generate(model, tokenizer, PROMPTS)
    handle.detach()
    after = generate(model, tokenizer, PROMPTS)
    assert torch.equal(zero[0], tokens) and torch.equal(zero[1], logits)
    assert torch.equal(after[0], tokens) and torch.equal(after[1], logits)
    assert not torch.allclose(steered[1], logits, atol=1e-2)  # the steering does something
    assert _no_hooks(model)


def test_detach_leaves_no_hooks_even_after_an_error(model, tokenizer, steering):
    with pytest.raises(RuntimeError, match="boom"):
        with attach(steering, model) as handle:
            assert not _no_hooks(model)
            raise RuntimeError("boom")
    assert not handle.attached and _no_hooks(model)


@pytest.mark.parametrize("gating", ["token", "causal"])
def test_kv_cache_gives_what_recomputing_gives(model, tokenizer, steering, gating):
    """Cached: each new token's lambda from the running (sum, count); uncached: every prefix again."""
    with attach(steering, model, strength=STRENGTH, gating=gating) as handle:
        cached = generate(model, tokenizer, PROMPTS)
        cached_scales = handle.scales
        recomputed = generate(model, tokenizer, PROMPTS, use_cache=False)
        recomputed_scales = handle.scales
    assert torch.equal(cached[0], recomputed[0])
    torch.testing.assert_close(cached[1], recomputed[1], rtol=1e-4, atol=1e-4)
    for name in steering.steered_layers:
        # every token but the last generated one went through the model: (batch, tokens - 1)
        assert cached_scales[name].shape == (len(PROMPTS), cached[0].shape[1] - 1)
        torch.testing.assert_close(cached_scales[name], recomputed_scales[name], rtol=1e-4, atol=1e-4)


def test_beam_search_with_token_gating_matches_recomputing(model, tokenizer, steering):
    """Beam search reorders the cache rows; every gating mode is checked in test_beam_search.py."""
    with attach(steering, model, strength=STRENGTH, gating="token"):
        cached = generate(model, tokenizer, PROMPTS, num_beams=3)
        recomputed = generate(model, tokenizer, PROMPTS, num_beams=3, use_cache=False)
    assert torch.equal(cached[0], recomputed[0])


def test_lambda_is_read_at_every_generated_token(model, tokenizer, steering):
    with attach(steering, model, strength=STRENGTH) as handle:
        tokens, _ = generate(model, tokenizer, PROMPTS, max_new_tokens=5)
        prompt_len = tokens.shape[1] - 5
        for name in steering.steered_layers:
            chunks = handle.history[name]
            assert [c.shape[1] for c in chunks] == [prompt_len, 1, 1, 1, 1]  # one O(1) call per new token
        # a second generation starts a new sequence: the state of the first one is gone
        generate(model, tokenizer, PROMPTS[:1], max_new_tokens=2)
        assert all(s.shape[0] == 1 for s in handle.scales.values())


@pytest.mark.parametrize("gating", ["token", "causal"])
def test_a_row_generates_the_same_alone_and_in_a_left_padded_batch(model, tokenizer, steering, gating):
    with attach(steering, model, strength=STRENGTH, gating=gating) as handle:
        batch_tokens, batch_logits = generate(model, tokenizer, PROMPTS)
        batch_scales = handle.scales
        for row, prompt in enumerate(PROMPTS):
            tokens, logits = generate(model, tokenizer, [prompt])
            pad = batch_tokens.shape[1] - tokens.shape[1]
            assert torch.equal(batch_tokens[row, pad:], tokens[0])
            torch.testing.assert_close(batch_logits[row], logits[0], rtol=1e-4, atol=1e-4)
            for name, lam in handle.scales.items():
                torch.testing.assert_close(batch_scales[name][row, pad:], lam[0], rtol=1e-4, atol=1e-4)
                assert not batch_scales[name][row, :pad].any()  # left padding is never steered


@pytest.mark.parametrize("gating", ["token", "causal", "sequence"])
def test_a_row_is_steered_the_same_alone_and_in_a_right_padded_batch(model, tokenizer, steering, gating):
    enc = right_padded(tokenizer, PROMPTS)
    with attach(steering, model, strength=STRENGTH, gating=gating) as handle:
        batch = model(**enc).logits
        batch_scales = handle.scales
        for row, prompt in enumerate(PROMPTS):
            n = int(enc["attention_mask"][row].sum())
            alone = model(**right_padded(tokenizer, [prompt])).logits
            torch.testing.assert_close(batch[row, :n], alone[0], rtol=1e-4, atol=1e-4)
            for name, lam in handle.scales.items():
                torch.testing.assert_close(batch_scales[name][row, :n], lam[0], rtol=1e-4, atol=1e-4)


def test_plain_steering_sets_every_lambda_to_one(model, tokenizer, steering):
    with attach(steering, model, gated=False) as handle:
        model(**right_padded(tokenizer, PROMPTS))
    assert set(handle.scales) == set(steering.layers)
    assert all(bool((lam == 1).all()) for lam in handle.scales.values())


def test_attach_refuses_what_it_cannot_use(model, steering):
    with pytest.raises(TypeError, match="steering must be a dsas_diffusion.Steering"):
        attach("steering-folder", model)
    with pytest.raises(TypeError, match="sets its own pre_forward"):
        attach(steering, model, pre_forward=lambda *a: None)
    assert _no_hooks(model)


def test_the_core_attach_steers_a_language_model_like_llm_attach(tokenizer):
    model, steering = make_model("llama"), fitted("llama")
    with attach(steering, model, strength=STRENGTH) as handle:
        expected, expected_scales = generate(model, tokenizer, PROMPTS), handle.scales
    with steering.attach(model, strength=STRENGTH) as handle:
        got, got_scales = generate(model, tokenizer, PROMPTS), handle.scales
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert all(torch.equal(got_scales[k], v) for k, v in expected_scales.items())
