"""Save -> from_pretrained -> the same generations; a steering is never applied to another model."""

from __future__ import annotations

import pytest
import torch

from dsas_diffusion import Steering
from dsas_diffusion.llm import attach
from tests.llm.tiny_lms import PROMPTS, fitted, generate, make_model, right_padded


def test_a_saved_steering_generates_the_same(model, tokenizer, steering, tmp_path):
    steering.save_pretrained(tmp_path)
    loaded = Steering.from_pretrained(tmp_path)
    assert loaded.layers == steering.layers and loaded.config.targets == steering.config.targets
    with attach(steering, model, strength=2.0) as handle:
        expected = generate(model, tokenizer, PROMPTS)
        expected_scales = handle.scales
    with attach(loaded, model, strength=2.0) as handle:
        got = generate(model, tokenizer, PROMPTS)
        assert all(torch.equal(handle.scales[k], v) for k, v in expected_scales.items())
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_a_steering_of_other_weights_is_refused(family, steering):
    with pytest.raises(ValueError, match="fitted on a model with other weights.*fit the steering again"):
        attach(steering, make_model(family, seed=1))


def test_a_steering_of_another_hidden_size_is_refused(family, steering):
    with pytest.raises(ValueError, match="parameters.*fit the steering again on this model"):
        attach(steering, make_model(family, hidden=32))


def test_a_steering_of_another_family_is_refused(family, steering):
    other = make_model("gpt2" if family != "gpt2" else "llama")
    with pytest.raises(ValueError, match="of class .*fit the steering again"):
        attach(steering, other)


def test_mismatched_hidden_size_is_caught_even_without_the_fingerprint_check(family, steering, tokenizer):
    small = make_model(family, hidden=32)
    with attach(steering, small, check_model=False):
        with pytest.raises(ValueError, match="width 32, but the steering was fitted on width 64.*fit it again"):
            small(**right_padded(tokenizer, PROMPTS))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in small.modules())


def test_a_language_model_steering_is_not_a_pipeline_one(tmp_path):
    steering = fitted("gpt2")
    steering.save_pretrained(tmp_path)
    assert Steering.from_pretrained(tmp_path).config.fingerprint.keys() == {""}
    with pytest.raises(ValueError, match="holds no layers for 'text_encoder'.*a language model"):
        steering.check_model(make_model("gpt2"), "text_encoder.", "text_encoder")
