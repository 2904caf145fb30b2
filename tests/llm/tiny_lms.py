"""Tiny, seeded, offline causal LMs of several families, a word-level tokenizer built from the test
sentences, and the texts. Nothing here touches a hub. (A module of its own, not conftest: the tests import from it.)"""

from __future__ import annotations

import random

import torch

ADJECTIVES = ["yellow", "small", "big", "old", "bright", "cute", "green", "red", "fresh", "ripe", "sweet", "soft",
              "dark", "tiny"]
PLACES = ["table", "plate", "beach", "street", "field", "bowl", "kitchen", "garden", "park", "city", "forest", "sea",
          "shop", "box"]
THINGS = ["dog", "cat", "car", "house", "tree", "bird", "flower", "horse", "boat", "man", "star", "fish", "chair",
          "lamp"]
TEMPLATE = "i see a {adj} {thing} on the {place}"
# (adjective, place) pairs in a fixed shuffled order: fitting takes the first 24, the held-out texts the next 16,
# so no held-out text was seen in fitting.
_PAIRS = random.Random(0).sample([(a, p) for a in ADJECTIVES for p in PLACES], 40)


def sentences(thing: str | None, pairs) -> list[str]:
    """One sentence per (adjective, place) pair about `thing` (None: a different ordinary thing in each)."""
    return [TEMPLATE.format(adj=a, place=p, thing=thing or THINGS[i % len(THINGS)]) for i, (a, p) in enumerate(pairs)]


SOURCE = sentences("banana", _PAIRS[:24])
TARGET = [s.replace("banana", "apple") for s in SOURCE]
CONTROL = sentences(None, _PAIRS[:24])
HELD_OUT_SOURCE = sentences("banana", _PAIRS[24:])
HELD_OUT_CONTROL = sentences(None, _PAIRS[24:])
PROMPTS = ["i see a banana", "the old dog is on the big table near the sea", "a tiny cat"]

SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
WORDS = sorted({w for w in TEMPLATE.split() if "{" not in w} | set(ADJECTIVES) | set(PLACES) | set(THINGS)
               | {"banana", "apple", "is", "near"})
PAD, BOS, EOS = 0, 1, 2
VOCAB_SIZE = 96  # > len(SPECIALS) + len(WORDS); the ids above the words are generated but never typed
FAMILIES = ["gpt2", "llama", "qwen2", "gemma2"]
# Families whose layers dsas_diffusion.llm.targets finds from their structure alone (deepseek_v4 only
# has its default preset in the table), built from their configs for tests/llm/test_any_architecture.py:
# extra config fields per family.
MORE_FAMILIES = {
    "phi3": {},
    "gpt_neox": {},
    "falcon": {},  # parallel attention + MLP, one shared norm; blocks return a tuple
    "olmo2": {},  # post-norm: no norm in front of the MLP
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32),
    "openai-gpt": {},  # blocks return a list
    "deepseek_v4": dict(head_dim=16),  # hyper-connections: blocks return (batch, tokens, streams, width)
}
CONTEXT = 64


def make_tokenizer(pad: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    for i in range(len(vocab), VOCAB_SIZE):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", BOS)])
    kwargs = {"pad_token": "[PAD]"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]",
                                   **kwargs)


def make_model(family: str, seed: int = 0, hidden: int = 64, layers: int = 2):
    """A tiny random causal LM; a large init std makes greedy decoding decisive (no near-ties)."""
    from transformers import (Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    ids = dict(vocab_size=VOCAB_SIZE, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, initializer_range=0.2)
    common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=CONTEXT, **ids)
    torch.manual_seed(seed)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=CONTEXT, **ids))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif family == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(head_dim=hidden // 4, **common))
    elif family in MORE_FAMILIES:
        from transformers import AutoConfig, AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **common, **MORE_FAMILIES[family]))
    else:
        raise KeyError(family)
    return model.eval()


# fit_steering options for the tiny random models (tests pass them unless they test these options):
# - pca_rank=10, not the LM default 16 nor the paper's 5: on a random tiny model every word is an equally strong
#   random direction, so the top 5 principal components of the pooled activations often miss the one word
#   (banana) that separates source from control; 10 of 64 dimensions reliably keep it;
# - continuations=0, lambda_floor=0 (the LM defaults are 32 and 0.9, measured on real models): a random model's
#   continuations are noise, and the floor would hide the lambdas the tests read.
TINY_FIT = dict(pca_rank=10, continuations=0, lambda_floor=0.0, progress=False)
_FITTED: dict = {}


def fitted(family: str, **options):
    """A steering fitted once per (family, options) on the seed-0 model; the model itself is rebuilt
    per test, so no test can leak hooks into another."""
    from dsas_diffusion.llm import fit_steering

    key = (family, tuple(sorted(options.items())))
    if key not in _FITTED:
        _FITTED[key] = fit_steering(make_model(family), make_tokenizer(), SOURCE, TARGET, CONTROL,
                                    **{**TINY_FIT, **options})
    return _FITTED[key]


def generate(model, tokenizer, texts, *, max_new_tokens: int = 6, **kwargs):
    """Greedy generation from left-padded prompts: (sequences, logits (B, new tokens, V))."""
    enc = tokenizer(list(texts), padding=True, padding_side="left", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD,
                         return_dict_in_generate=True, output_logits=True, **kwargs)
    return out.sequences, torch.stack(out.logits, 1)


def right_padded(tokenizer, texts):
    return tokenizer(list(texts), padding=True, padding_side="right", return_tensors="pt")
