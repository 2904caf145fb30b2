"""Reading a causal-LM call: this call's real tokens and the length of the sequence before it."""

from __future__ import annotations

import torch

from dsas_diffusion.core import HookSet
from dsas_diffusion.llm.sequence import cache_length, call_tokens, causal_lm_pre_forward
from tests.llm.tiny_lms import make_model


def test_the_current_tokens_are_the_last_columns_of_the_mask():
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    valid, past = call_tokens({"input_ids": torch.zeros(2, 1, dtype=torch.long), "attention_mask": mask})
    assert past == 3 and valid.tolist() == [[True], [True]]
    valid, past = call_tokens({"inputs_embeds": torch.zeros(2, 4, 8), "attention_mask": mask})
    assert past == 0 and valid.tolist() == mask.bool().tolist()


def test_without_a_mask_every_token_is_real_and_the_cache_says_how_far_we_are():
    class Cache:
        def get_seq_length(self):
            return 5

    assert call_tokens({"input_ids": torch.zeros(1, 1, dtype=torch.long), "cache": Cache()}) == (None, 5)
    assert call_tokens({"input_ids": torch.zeros(1, 3, dtype=torch.long)}) == (None, 0)
    legacy = ((torch.zeros(1, 2, 7, 4), torch.zeros(1, 2, 7, 4)),)
    assert cache_length(legacy) == 7 and cache_length(None) == 0


def test_positional_arguments_are_read_by_name():
    model = make_model("llama")  # forward(input_ids, attention_mask, ...)
    hooks = HookSet(model, [], causal_lm_pre_forward(model))
    hooks._attach()
    model(torch.tensor([[1, 5, 0]]), torch.tensor([[1, 1, 0]]))
    hooks.remove()
    assert hooks.valid.tolist() == [[True, True, False]]
