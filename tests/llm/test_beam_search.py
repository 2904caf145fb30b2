"""Decoding that moves or crops the KV cache: the running gate state of each row must go with it.

Beam search reorders the cache's rows at every step; the ground truth is a beam search in which
nothing is carried between steps: every step recomputes the steered forward without a cache
(`use_cache=False`), or, for `sequence` gating (whose cached generation pools the prompt in its
own call, which an uncached recomputation of the whole prefix cannot reproduce), replays each
beam from its prompt on a cache of its own that is never reordered.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache, LogitsProcessor

from dsas_diffusion.llm import attach
from tests.llm.tiny_lms import PAD, PROMPTS, fitted, generate, make_model, make_tokenizer

STRENGTH = 2.0
BEAMS = dict(num_beams=3, num_return_sequences=3, max_new_tokens=6)


class ReplayEachBeam(LogitsProcessor):
    """Replaces each beam's scores by those of a fresh greedy generation that is forced through the
    beam's tokens: its prompt in one call, then one cached call per token, never reordered."""

    def __init__(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
        self.model, self.prompt_ids, self.prompt_mask = model, prompt_ids, prompt_mask

    def __call__(self, input_ids, scores):
        rows = input_ids.shape[0] // self.prompt_ids.shape[0]
        prompt_len = self.prompt_ids.shape[1]
        forced = input_ids[:, prompt_len:]
        out = self.model.generate(input_ids=input_ids[:, :prompt_len],
                                  attention_mask=self.prompt_mask.repeat_interleave(rows, 0),
                                  max_new_tokens=forced.shape[1] + 1, do_sample=False, pad_token_id=PAD,
                                  logits_processor=[_Force(forced, prompt_len)], output_logits=True,
                                  return_dict_in_generate=True)
        assert len(out.logits) == forced.shape[1] + 1  # no beam was stopped early by an EOS
        return torch.log_softmax(out.logits[-1].float(), dim=-1)


class _Force(LogitsProcessor):
    def __init__(self, tokens: torch.Tensor, prompt_len: int):
        self.tokens, self.prompt_len = tokens, prompt_len

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_len
        if step >= self.tokens.shape[1]:
            return scores
        forced = torch.full_like(scores, -float("inf"))
        return forced.scatter(1, self.tokens[:, step:step + 1], 0.0)


def _beams(model, tokenizer, **kwargs) -> torch.Tensor:
    return generate(model, tokenizer, PROMPTS, **BEAMS, **kwargs)[0]


def _replayed_beams(model, tokenizer) -> torch.Tensor:
    enc = tokenizer(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    replay = ReplayEachBeam(model, enc["input_ids"], enc["attention_mask"])
    return _beams(model, tokenizer, use_cache=False, logits_processor=[replay])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("gating", ["token", "causal", "sequence"])
def test_beam_search_gives_the_uncached_beams(family, gating):
    model, tokenizer = make_model(family), make_tokenizer()
    with attach(fitted(family), model, strength=STRENGTH, gating=gating):
        cached = _beams(model, tokenizer)
        if gating == "sequence":
            expected = _replayed_beams(model, tokenizer)
        else:
            expected = _beams(model, tokenizer, use_cache=False)
    assert torch.equal(cached, expected)
    assert not torch.equal(cached, _beams(model, tokenizer))  # the steering changes the beams


def test_replaying_each_beam_is_the_uncached_ground_truth():
    """The reference used for `sequence` gating, checked where recomputing without a cache applies."""
    model, tokenizer = make_model("llama"), make_tokenizer()
    with attach(fitted("llama"), model, strength=STRENGTH, gating="causal"):
        assert torch.equal(_replayed_beams(model, tokenizer), _beams(model, tokenizer, use_cache=False))


@torch.no_grad()  # a cache of tensors with autograd history cannot be deep-copied
def _forward(model, ids, mask, cache=None):
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1]:]
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache).logits


@pytest.mark.parametrize("gating", ["token", "causal", "sequence"])
def test_a_reordered_cache_continues_each_row_as_its_new_sequence(gating):
    """Rows moved by hand (with a duplicate, as beam search does), then one more token: the logits
    and the recorded lambdas of each row are those of its new sequence replayed from scratch."""
    model, tokenizer = make_model("qwen2"), make_tokenizer()
    enc = tokenizer(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    order, nxt = torch.tensor([2, 0, 0]), torch.tensor([[7], [9], [11]])
    ones = torch.ones(3, 1, dtype=mask.dtype)
    with attach(fitted("qwen2"), model, strength=STRENGTH, gating=gating) as handle:
        cache = DynamicCache(config=model.config)
        _forward(model, ids, mask, cache)
        cache.reorder_cache(order)
        moved = _forward(model, nxt, torch.cat([mask[order], ones], 1), cache)[:, -1]
        moved_scales = handle.scales
        fresh = DynamicCache(config=model.config)
        _forward(model, ids[order], mask[order], fresh)
        expected = _forward(model, nxt, torch.cat([mask[order], ones], 1), fresh)[:, -1]
        expected_scales = handle.scales
    torch.testing.assert_close(moved, expected, rtol=1e-5, atol=1e-5)
    assert moved_scales.keys() == expected_scales.keys()
    for name, lam in moved_scales.items():
        torch.testing.assert_close(lam, expected_scales[name], rtol=1e-5, atol=1e-5)


LOOKUP = ["i see a banana i see a banana i see a"]  # repeats itself: prompt lookup proposes tokens to check


@pytest.mark.parametrize("gating", ["token", "causal"])
def test_prompt_lookup_decoding_takes_the_state_back_when_it_crops_the_cache(gating):
    """Prompt lookup checks several proposed tokens in one call and crops the rejected ones from
    the cache; the state goes back to the kept length, so the tokens are plain greedy decoding's."""
    model, tokenizer = make_model("llama"), make_tokenizer()
    with attach(fitted("llama"), model, strength=STRENGTH, gating=gating) as handle:
        greedy, greedy_logits = generate(model, tokenizer, LOOKUP, max_new_tokens=8)
        greedy_scales = handle.scales
        lookup, _ = generate(model, tokenizer, LOOKUP, max_new_tokens=8, prompt_lookup_num_tokens=3)
        lookup_scales = handle.scales
    assert torch.equal(lookup, greedy)
    for name, lam in lookup_scales.items():  # the rejected tokens' lambdas are dropped too
        torch.testing.assert_close(lam, greedy_scales[name], rtol=1e-5, atol=1e-5)


def test_prompt_lookup_decoding_with_sequence_gating_is_refused_by_name():
    model, tokenizer = make_model("llama"), make_tokenizer()
    with attach(fitted("llama"), model, strength=STRENGTH, gating="sequence"):
        with pytest.raises(ValueError, match="gating='sequence' cannot follow a KV cache that is cropped.*'causal'"):
            generate(model, tokenizer, LOOKUP, max_new_tokens=8, prompt_lookup_num_tokens=3)
        generate(model, tokenizer, LOOKUP, max_new_tokens=2)  # a new generation starts clean


def test_cropping_further_back_than_the_last_call_is_refused():
    model, tokenizer = make_model("llama"), make_tokenizer()
    enc = tokenizer(PROMPTS[:1], return_tensors="pt")
    with attach(fitted("llama"), model, strength=STRENGTH, gating="causal"):
        cache = DynamicCache(config=model.config)
        _forward(model, enc["input_ids"], enc["attention_mask"], cache)
        _forward(model, torch.tensor([[7]]), torch.ones(1, enc["input_ids"].shape[1] + 1, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="cropped by 2 tokens.*only go back within the last forward call"):
            cache.crop(-2)
        with pytest.raises(ValueError, match="cropped by 2 tokens"):  # the sequence stays refused
            _forward(model, torch.tensor([[9]]), torch.ones(1, enc["input_ids"].shape[1], dtype=torch.long), cache)


def test_a_crop_after_a_call_switched_off_goes_back_to_where_that_call_began():
    """A call at strength 0 leaves the running state as it was; cropping its token takes the state back to
    where that call began (the end of the prompt), not into the prompt, the last call that moved it."""
    model, tokenizer = make_model("llama"), make_tokenizer()
    enc = tokenizer(PROMPTS[:1], return_tensors="pt")
    length = enc["input_ids"].shape[1]
    with attach(fitted("llama"), model, strength=STRENGTH, gating="causal") as handle:
        cache = DynamicCache(config=model.config)
        _forward(model, enc["input_ids"], enc["attention_mask"], cache)
        after_prompt = dict(handle.running)
        with handle.local_options(strength=0.0):
            _forward(model, torch.tensor([[7]]), torch.ones(1, length + 1, dtype=torch.long), cache)
        cache.crop(-1)
        assert handle.running.keys() == after_prompt.keys()
        for name, (mean, count) in handle.running.items():
            assert torch.equal(mean, after_prompt[name][0]) and torch.equal(count, after_prompt[name][1])
        with pytest.raises(ValueError, match="cropped by 1 tokens.*only go back within the last forward call"):
            cache.crop(-1)  # the crop above took the off call back to its start: nothing of it is left


def test_a_copy_of_a_followed_cache_moves_its_own_rows():
    model, tokenizer = make_model("llama"), make_tokenizer()
    enc = tokenizer(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    with attach(fitted("llama"), model, strength=STRENGTH):
        cache = DynamicCache(config=model.config)
        _forward(model, enc["input_ids"], enc["attention_mask"], cache)
        keys = cache.layers[0].keys.clone()
        copied = copy.deepcopy(cache)
        copied.reorder_cache(torch.tensor([2, 0, 0]))
        copied.crop(-1)
    assert torch.equal(cache.layers[0].keys, keys)  # the original is untouched
    assert torch.equal(copied.layers[0].keys, keys[[2, 0, 0], :, :-1])


def test_every_copy_of_a_prompt_cache_continues_the_prompt_state():
    """transformers' prefix caching: `copy.deepcopy(prompt_cache)` for each continuation. A copy carries the
    running state its cache's sequence had reached, so every reuse continues the prompt's state (the second was
    refused: the thread's state had moved on with the first), and each equals the whole sequence run at once."""
    model, tokenizer = make_model("llama"), make_tokenizer()
    enc = tokenizer(PROMPTS[1:2], return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    n = ids.shape[1]
    with attach(fitted("llama"), model, strength=STRENGTH, gating="causal") as handle:
        prompt_cache = DynamicCache(config=model.config)
        _forward(model, ids, mask, prompt_cache)
        for more in (torch.tensor([[7, 9]]), torch.tensor([[11, 4]]), torch.tensor([[7, 9]])):
            reused = _forward(model, more, torch.ones(1, n + 2, dtype=mask.dtype), copy.deepcopy(prompt_cache))
            lambdas = handle.scales
            whole = _forward(model, torch.cat([ids, more], 1), torch.ones(1, n + 2, dtype=mask.dtype))
            torch.testing.assert_close(reused, whole[:, -2:], rtol=1e-5, atol=1e-5)
            for name, lam in lambdas.items():  # the continuation's own two tokens, as in the whole run
                torch.testing.assert_close(lam, handle.scales[name][:, -2:], rtol=1e-6, atol=1e-6)
    assert prompt_cache.get_seq_length() == n


def test_at_strength_0_any_cache_runs_as_on_the_stock_model():
    """Strength 0 steers nothing, so a cache the running state cannot follow is not refused there (the stock model
    takes it); the state is dropped instead."""
    model, tokenizer = make_model("llama"), make_tokenizer()
    enc = tokenizer(PROMPTS[1:2], return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    n = ids.shape[1]
    stock_cache = DynamicCache(config=model.config)
    _forward(model, ids, mask, stock_cache)  # filled before attaching: it carries no state
    expected = _forward(model, torch.tensor([[7]]), torch.ones(1, n + 1, dtype=mask.dtype), copy.deepcopy(stock_cache))
    with attach(fitted("llama"), model, strength=STRENGTH) as handle:
        _forward(model, ids[:, :2], mask[:, :2], DynamicCache(config=model.config))
        with pytest.raises(ValueError, match=f"continues a cached sequence of {n} tokens.*sequence of 2 tokens"):
            _forward(model, torch.tensor([[7]]), torch.ones(1, n + 1, dtype=mask.dtype), copy.deepcopy(stock_cache))
        handle.strength = 0.0
        got = _forward(model, torch.tensor([[7]]), torch.ones(1, n + 1, dtype=mask.dtype), copy.deepcopy(stock_cache))
    assert torch.equal(got, expected)


def test_a_copy_moved_before_use_and_an_emptied_cache_refilled_are_followed():
    """A copy's carried state moves with the copy's rows (reordered before its first continuation), and a cache
    emptied and filled again is followed anew: each then equals a followed cache reordered the same way (the
    refilled one was not followed, and its reorder missed the state)."""
    model, tokenizer = make_model("llama"), make_tokenizer()
    enc = tokenizer(PROMPTS[:2], padding=True, padding_side="left", return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    order, more = torch.tensor([1, 0]), torch.tensor([[7], [9]])
    mask_after = torch.cat([mask[order], torch.ones(2, 1, dtype=mask.dtype)], 1)
    with attach(fitted("llama"), model, strength=STRENGTH, gating="causal"):
        followed = DynamicCache(config=model.config)
        _forward(model, ids, mask, followed)
        followed.reorder_cache(order)
        expected = _forward(model, more, mask_after, followed)
        prompt_cache = DynamicCache(config=model.config)
        _forward(model, ids, mask, prompt_cache)
        copied = copy.deepcopy(prompt_cache)
        copied.reorder_cache(order)
        torch.testing.assert_close(_forward(model, more, mask_after, copied), expected, rtol=0, atol=0)
        # beam search over a prefix cache repeats its rows first
        four, mask_four = torch.tensor([[7], [9], [4], [5]]), torch.cat([mask.repeat_interleave(2, 0),
                                                                          torch.ones(4, 1, dtype=mask.dtype)], 1)
        repeated = DynamicCache(config=model.config)
        _forward(model, ids, mask, repeated)
        repeated.batch_repeat_interleave(2)
        copied = copy.deepcopy(prompt_cache)
        copied.batch_repeat_interleave(2)
        torch.testing.assert_close(_forward(model, four, mask_four, copied), _forward(model, four, mask_four, repeated),
                                   rtol=0, atol=0)
        refilled = DynamicCache(config=model.config)
        _forward(model, ids, mask, refilled)
        refilled.reset()
        _forward(model, ids, mask, refilled)
        refilled.reorder_cache(order)
        torch.testing.assert_close(_forward(model, more, mask_after, refilled), expected, rtol=0, atol=0)


def test_a_cache_does_not_keep_a_detached_steering_alive():
    import gc
    import weakref

    model, tokenizer = make_model("llama"), make_tokenizer()
    enc = tokenizer(PROMPTS[:1], return_tensors="pt")
    handle = attach(fitted("llama"), model, strength=STRENGTH)
    cache = DynamicCache(config=model.config)
    _forward(model, enc["input_ids"], enc["attention_mask"], cache)
    handle.detach()
    gone = weakref.ref(handle)
    del handle
    gc.collect()
    assert gone() is None and cache.get_seq_length() == enc["input_ids"].shape[1]


def test_a_compiled_model_at_strength_0_takes_the_crops_of_prompt_lookup():
    """Compiled, the running state moves at strength 0 too (the graph selects by the strength); a crop it cannot
    follow (sequence gating after a call of several tokens) then drops the state instead of refusing, as eagerly."""
    from tests.graph_counts import counting

    model, tokenizer = make_model("llama"), make_tokenizer()
    expected, _ = generate(model, tokenizer, LOOKUP, max_new_tokens=8, prompt_lookup_num_tokens=3)
    with counting() as stock:  # the same calls on a stock copy compiled alike: as many graphs, not an eager fall-back
        stock_model = make_model("llama")
        stock_model.compile(backend=stock.backend)
        generate(stock_model, tokenizer, LOOKUP, max_new_tokens=8, prompt_lookup_num_tokens=3)
    with counting() as seen, attach(fitted("llama"), model, strength=0.0, gating="sequence"):
        model.compile(backend=seen.backend)
        got, _ = generate(model, tokenizer, LOOKUP, max_new_tokens=8, prompt_lookup_num_tokens=3)
    assert torch.equal(got, expected)
    assert seen.graphs == stock.graphs and not seen.breaks and not stock.breaks, (stock, seen)


def test_two_cached_sequences_interleaved_in_one_thread_each_continue_their_own_state():
    """Each cache keeps the state its sequence left when the thread went on with the other (this was refused)."""
    model, tokenizer = make_model("llama"), make_tokenizer()
    prompts = [tokenizer(PROMPTS[i:i + 1], return_tensors="pt") for i in (0, 1)]
    steps = [(0, 7), (1, 9), (0, 4), (1, 5), (0, 11)]

    def run(order):
        caches, lengths, out = {}, {}, {}
        for i in sorted(set(i for i, _ in order)):
            caches[i] = DynamicCache(config=model.config)
            lengths[i] = prompts[i]["input_ids"].shape[1]
        for i, token in order:
            if i not in out:
                _forward(model, prompts[i]["input_ids"], prompts[i]["attention_mask"], caches[i])
                out[i] = []
            lengths[i] += 1
            out[i].append(_forward(model, torch.tensor([[token]]), torch.ones(1, lengths[i], dtype=torch.long),
                                   caches[i]))
        return out

    with attach(fitted("llama"), model, strength=STRENGTH, gating="causal"):
        together = run(steps)
        alone = {i: run([s for s in steps if s[0] == i])[i] for i in (0, 1)}
    for i in (0, 1):
        for a, b in zip(together[i], alone[i]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
