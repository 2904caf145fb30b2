"""Any transformers causal LM is steerable with no preset of its own: the default layers come from the
model's structure, and on each family steering keeps the oracle (strength 0 and detach change nothing),
the KV cache changes nothing, and a prompt is steered the same alone and in a padded batch."""

from __future__ import annotations

import pytest
import torch

from dsas_diffusion.llm import attach, resolve_layers
from dsas_diffusion.llm.blocks import block_classes
from tests.llm.tiny_lms import EOS, FAMILIES, MORE_FAMILIES, PAD, PROMPTS, fitted, generate, make_model, make_tokenizer

ALL_FAMILIES = FAMILIES + list(MORE_FAMILIES)
STRENGTH = 2.0
# what each family's default and attention-output presets resolve to in block 0 (read off the models)
BLOCK_0 = {
    "gpt2": ("transformer.h.0", "transformer.h.0.attn.c_proj"),
    "llama": ("model.layers.0", "model.layers.0.self_attn.o_proj"),
    "qwen2": ("model.layers.0", "model.layers.0.self_attn.o_proj"),
    "gemma2": ("model.layers.0.post_feedforward_layernorm", "model.layers.0.self_attn.o_proj"),
    "phi3": ("model.layers.0", "model.layers.0.self_attn.o_proj"),
    "gpt_neox": ("gpt_neox.layers.0", "gpt_neox.layers.0.attention.dense"),
    "falcon": ("transformer.h.0", "transformer.h.0.self_attention.dense"),
    "olmo2": ("model.layers.0", "model.layers.0.self_attn.o_proj"),
    "mixtral": ("model.layers.0", "model.layers.0.self_attn.o_proj"),
    "qwen2_moe": ("model.layers.0", "model.layers.0.self_attn.o_proj"),
    "openai-gpt": ("transformer.h.0", "transformer.h.0.attn.c_proj"),
    "deepseek_v4": ("model.layers.0.post_attention_layernorm", None),  # its attention has no output projection
}


@pytest.fixture(params=ALL_FAMILIES)
def any_family(request) -> str:
    return request.param


@pytest.fixture
def any_model(any_family):
    return make_model(any_family)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_default_layers_are_one_module_per_decoder_block(any_family, any_model):
    _, names = resolve_layers(any_model)
    default, attention = BLOCK_0[any_family]
    assert names == [default, default.replace(".0", ".1", 1)]
    if attention is not None:
        assert resolve_layers(any_model, "o_proj")[1] == [attention, attention.replace(".0", ".1", 1)]
    blocks = resolve_layers(any_model, "residual")[1]
    block_types = {type(any_model.get_submodule(b)).__name__ for b in blocks}
    if any_family == "openai-gpt":
        assert not block_classes(any_model)  # lists no _no_split_modules: the one list of one class is taken
    else:
        assert block_types <= block_classes(any_model)  # the class transformers keeps whole


def _no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_strength_zero_and_detach_are_bit_identical(any_family, any_model, tokenizer):
    steering = fitted(any_family)  # fitted on the default layers
    tokens, logits = generate(any_model, tokenizer, PROMPTS)
    with attach(steering, any_model, strength=0.0):
        zero = generate(any_model, tokenizer, PROMPTS)
    with attach(steering, any_model, strength=STRENGTH):
        steered = generate(any_model, tokenizer, PROMPTS)
    after = generate(any_model, tokenizer, PROMPTS)
    assert torch.equal(zero[0], tokens) and torch.equal(zero[1], logits)
    assert torch.equal(after[0], tokens) and torch.equal(after[1], logits)
    assert not torch.allclose(steered[1], logits, atol=1e-2)  # the steering does something
    assert _no_hooks(any_model)


def _greedy_without_cache(model, tokenizer, prompt: str, new_tokens: int):
    """Token by token, each step a fresh forward over the whole prefix, stopping at EOS as generate does:
    (tokens, logits (1, new, V))."""
    ids = tokenizer([prompt], return_tensors="pt")["input_ids"]
    logits = []
    for _ in range(new_tokens):
        last = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[:, -1]
        logits.append(last)
        ids = torch.cat([ids, last.argmax(-1, keepdim=True)], 1)
        if ids[0, -1] == EOS:
            break
    return ids, torch.stack(logits, 1)


def test_cached_generation_equals_decoding_without_cache(any_family, any_model, tokenizer):
    steering = fitted(any_family)
    with attach(steering, any_model, strength=STRENGTH) as handle:  # the default gating
        for prompt in PROMPTS:
            cached, cached_logits = generate(any_model, tokenizer, [prompt], max_new_tokens=4)
            cached_scales = handle.scales
            tokens, logits = _greedy_without_cache(any_model, tokenizer, prompt, 4)
            assert torch.equal(cached, tokens), prompt
            torch.testing.assert_close(cached_logits, logits, rtol=1e-4, atol=1e-4)
            for name, lam in handle.scales.items():  # the last step saw every token but the last
                torch.testing.assert_close(cached_scales[name], lam, rtol=1e-4, atol=1e-4)


def test_a_prompt_is_steered_the_same_alone_and_in_a_padded_batch(any_family, any_model, tokenizer):
    steering = fitted(any_family)
    with attach(steering, any_model, strength=STRENGTH) as handle:
        batch_tokens, batch_logits = generate(any_model, tokenizer, PROMPTS, max_new_tokens=4)
        batch_scales = handle.scales
        width = batch_tokens.shape[1] - batch_logits.shape[1]  # the left-padded prompts
        for row, prompt in enumerate(PROMPTS):
            tokens, logits = generate(any_model, tokenizer, [prompt], max_new_tokens=4)
            pad, new = width - len(tokenizer(prompt)["input_ids"]), logits.shape[1]  # alone it may stop early at EOS
            assert torch.equal(batch_tokens[row, pad:pad + tokens.shape[1]], tokens[0]), prompt
            assert batch_tokens[row, pad + tokens.shape[1]:].eq(PAD).all()  # what the batch generated after EOS
            torch.testing.assert_close(batch_logits[row, :new], logits[0], rtol=1e-4, atol=1e-4)
            for name, lam in handle.scales.items():
                torch.testing.assert_close(batch_scales[name][row, pad:pad + lam.shape[1]], lam[0], rtol=1e-4,
                                           atol=1e-4)
                assert not batch_scales[name][row, :pad].any()  # left padding is never steered
