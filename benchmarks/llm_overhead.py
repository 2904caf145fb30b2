"""LLM section of the overhead benchmark: plain vs steered prefill and generate() on a Llama-style LM."""

from __future__ import annotations

import copy
import functools

import torch

from .measure import compare
from .models import TOKENIZER, llama, lm_steering


def llm(args) -> dict:
    from transformers import CLIPTokenizer

    from dsas_diffusion.llm import attach

    model = llama(full=not args.quick, dtype=args.dtype).to(args.device)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)  # any tokenizer with a pad token: ids stay below 512
    steering = lm_steering(model, tokenizer)
    handle = [None]

    def plain():
        if handle[0] is not None:
            handle[0].detach()
            handle[0] = None

    def steered():
        plain()
        handle[0] = attach(steering, model, strength=1.0)

    if args.compile:  # compiled copies: a plain one and one whose steering is traced into its graph
        compiled = copy.deepcopy(model), copy.deepcopy(model)
        attach(steering, compiled[1], strength=1.0)
        for m in compiled:
            m.compile()
    new_tokens = 8 if args.quick else 32
    prompt_len = 32 if args.quick else 128
    cases = {}
    for batch in (1, 8):
        ids = torch.randint(3, 512, (batch, prompt_len), generator=torch.Generator().manual_seed(batch)).to(args.device)
        mask = torch.ones_like(ids)

        def prefill(ids=ids, mask=mask):
            model(input_ids=ids, attention_mask=mask, use_cache=True)

        def generate(ids=ids, mask=mask):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=0)

        cases[f"llm prefill, batch {batch}"] = ((plain, prefill), (steered, prefill))
        cases[f"llm generate {new_tokens} tokens, batch {batch}"] = ((plain, generate), (steered, generate))
        if args.compile and batch == 1:  # each batch size costs minutes of compiling
            cases[f"llm compiled generate, batch {batch}"] = tuple(
                functools.partial(m.generate, input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0) for m in compiled)
    # a call takes a second or less, and decoding is read off as generate minus prefill: more repeats
    results = compare(cases, args.device, args.llm_repeats or (args.repeats if args.quick else 15))
    plain()
    for batch in (1, 8):  # decode alone: generate minus its prefill
        g, p = results[f"llm generate {new_tokens} tokens, batch {batch}"], results[f"llm prefill, batch {batch}"]
        plain_decode = g["base_seconds"] - p["base_seconds"]
        steered_decode = g["seconds"] - p["seconds"]
        results[f"llm decode only, batch {batch}"] = {
            "time_ratio": steered_decode / plain_decode, "mem_ratio": g["mem_ratio"],
            "seconds": steered_decode, "base_seconds": plain_decode,
            "tokens_per_s": batch * new_tokens / steered_decode, "base_tokens_per_s": batch * new_tokens / plain_decode}
    return results
