"""Measuring a language model of the toy world (`lm_world`): greedy continuations of held-out
prompts, the exact concept rule, and how much steering changes what it should leave alone.

    evaluate_lm(model, tokenizer, steering, 4.0, gating="sequence")   # one setting -> dict of rates
    sweep()                                 # plain vs DSAS over methods x gating modes x strengths

`python -m dsas_diffusion.toy.lm_eval [method ...]` prints a sweep for the checkpoint in
assets/toy-lm (about two minutes for the three map families on one CPU core).
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterable, Sequence

import torch

from .lm_world import (EVAL_CONTROL_PROMPTS, EVAL_SOURCE_PROMPTS, MAX_NEW_TOKENS, concept_rate,
                       continuation_kind, fitting_sets, parse_prompt)


def _batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_continuations(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = MAX_NEW_TOKENS,
                           batch_size: int = 64, do_sample: bool = False, seed: int = 0) -> list[list[str]]:
    """The words each prompt is continued with, up to (not including) EOS, from left-padded batched
    `generate()`; greedy unless `do_sample` (then temperature 1, no top-k / top-p, torch's global
    RNG seeded with `seed`)."""
    if do_sample:
        torch.manual_seed(seed)
        options = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    else:
        options = dict(do_sample=False)
    stop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    out = []
    for batch in _batches(list(prompts), batch_size):
        enc = tokenizer(batch, padding=True, padding_side="left", return_tensors="pt").to(_device(model))
        seq = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **options)
        for row in seq[:, enc["input_ids"].shape[1]:].tolist():
            out.append(tokenizer.convert_ids_to_tokens(list(itertools.takewhile(lambda t: t not in stop, row))))
    return out


@torch.no_grad()
def continuation_log_probs(model, tokenizer, prompt: str, continuation: Sequence[str],
                           handle=None) -> tuple[torch.Tensor, float]:
    """(log-probabilities (n + 1, V) of the next token at the positions that predict the n words of
    `continuation` and the EOS after them, mean lambda), fed token by token through the KV cache
    exactly as `generate()` feeds them, so every gating mode sees what it sees in generation.

    With `handle` (an attached steering) the mean lambda is over its recorded layers and every
    token but the first (BOS, never steered); else NaN."""
    device = _device(model)
    # transformers 5 calls the KV cache `cache`, earlier versions `past_key_values`
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    out = model(input_ids=ids, use_cache=True)
    logits = [out.logits[0, -1]]
    for token in tokenizer.convert_tokens_to_ids(list(continuation)):
        out = model(input_ids=torch.tensor([[token]], device=device), use_cache=True, **{key: getattr(out, key)})
        logits.append(out.logits[0, -1])
    lam = float("nan")
    if handle is not None and handle.scales:
        lam = torch.cat([v[:, 1:].flatten().float() for v in handle.scales.values()]).mean().item()
    return torch.stack(logits).float().log_softmax(-1).cpu(), lam


def _kinds(prompts: Sequence[str], continuations: Sequence[Sequence[str]]) -> list[str | None]:
    """`continuation_kind` of each continuation after its prompt (without the prompt for texts
    that are not prompts of the world)."""
    return [continuation_kind(c, p if parse_prompt(p) is not None else None) for p, c in zip(prompts, continuations)]


def _token_drift(a: Sequence[str], b: Sequence[str]) -> float:
    """Fraction of positions (over the longer of the two) where two continuations differ."""
    n = max(len(a), len(b))
    return sum(1 for i in range(n) if i >= len(a) or i >= len(b) or a[i] != b[i]) / n if n else 0.0


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def unsteered_baseline(model, tokenizer, source_prompts: Sequence[str] | None = None,
                       control_prompts: Sequence[str] | None = None, max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """The model's own greedy continuations and control log-probs, which every steered setting is compared to."""
    source_prompts = list(EVAL_SOURCE_PROMPTS if source_prompts is None else source_prompts)
    control_prompts = list(EVAL_CONTROL_PROMPTS if control_prompts is None else control_prompts)
    control = generate_continuations(model, tokenizer, control_prompts, max_new_tokens=max_new_tokens)
    return {
        "source": generate_continuations(model, tokenizer, source_prompts, max_new_tokens=max_new_tokens),
        "control": control,
        "control_log_probs": [continuation_log_probs(model, tokenizer, p, c)[0] for p, c in zip(control_prompts, control)],
    }


def evaluate_lm(
    model,
    tokenizer,
    steering=None,
    alpha: float = 1.0,
    *,
    gated: bool = True,
    source_prompts: Sequence[str] | None = None,
    control_prompts: Sequence[str] | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    baseline: dict | None = None,
    **attach_options,
) -> dict[str, float]:
    """Measure one steering setting on held-out prompts (default `EVAL_SOURCE_PROMPTS` and
    `EVAL_CONTROL_PROMPTS`) with greedy decoding; `steering=None` or `alpha=0` measures the model
    itself. `gated=False` is plain steering (lambda = 1 on every fitted layer); `attach_options` go
    to `dsas_diffusion.llm.attach` (gating, lambda_floor, skip_first_token, layers).

    Returns fractions of prompts unless said otherwise:

    - concept_rate_source / concept_rate_control: continuations with a concept word (the exact rule);
    - source_polite: source continuations that are exactly a polite answer of the world;
    - source_well_formed / control_well_formed: continuations the world's grammar can produce after
      their prompt (`continuation_kind`);
    - control_unchanged: control continuations identical to the unsteered ones;
    - control_token_drift: mean share of positions where a control continuation differs from the
      unsteered one;
    - control_kl: mean KL(unsteered || steered) of the next-token distributions along the unsteered
      control continuations (nats per token, fed token by token as in generation);
    - lambda_source / lambda_control: mean lambda over the hooked layers and tokens in those passes
      (source: along the unsteered source continuations); NaN unsteered, 1 for plain steering.

    `baseline` (from `unsteered_baseline` on the same prompts) saves recomputing the unsteered
    continuations on every call of a sweep.
    """
    from ..llm import attach

    source_prompts = list(EVAL_SOURCE_PROMPTS if source_prompts is None else source_prompts)
    control_prompts = list(EVAL_CONTROL_PROMPTS if control_prompts is None else control_prompts)
    if baseline is None:
        baseline = unsteered_baseline(model, tokenizer, source_prompts, control_prompts, max_new_tokens)
    base_source, base_control, base_logp = baseline["source"], baseline["control"], baseline["control_log_probs"]
    if steering is None or alpha == 0:
        source, control, logp = base_source, base_control, base_logp
        lam_source = lam_control = float("nan")
    else:
        with attach(steering, model, strength=alpha, gated=gated, **attach_options) as handle:
            source = generate_continuations(model, tokenizer, source_prompts, max_new_tokens=max_new_tokens)
            control = generate_continuations(model, tokenizer, control_prompts, max_new_tokens=max_new_tokens)
            lam_source = _mean(continuation_log_probs(model, tokenizer, p, c, handle)[1]
                               for p, c in zip(source_prompts, base_source))
            passes = [continuation_log_probs(model, tokenizer, p, c, handle)
                      for p, c in zip(control_prompts, base_control)]
        logp, lam_control = [x for x, _ in passes], _mean(lam for _, lam in passes)
    kinds_source = _kinds(source_prompts, source)
    return {
        "alpha": float(alpha),
        "gated": bool(gated),
        "concept_rate_source": concept_rate(source),
        "concept_rate_control": concept_rate(control),
        "source_polite": _mean(k == "polite" for k in kinds_source),
        "source_well_formed": _mean(k is not None for k in kinds_source),
        "control_well_formed": _mean(k is not None for k in _kinds(control_prompts, control)),
        "control_unchanged": _mean(a == b for a, b in zip(control, base_control)),
        "control_token_drift": _mean(_token_drift(a, b) for a, b in zip(control, base_control)),
        "control_kl": _mean((b.exp() * (b - s)).sum(-1).mean().item() for b, s in zip(base_logp, logp)),
        "lambda_source": lam_source,
        "lambda_control": lam_control,
    }


# ---- a Pareto sweep ------------------------------------------------------------------------------------

SWEEP_ALPHAS = (1.0, 2.0, 3.0, 4.0, 6.0)
SWEEP_GATINGS = ("token", "causal", "sequence")
DEFAULT_ASSET = "assets/toy-lm"


def sweep(args=None, *, path: str | None = None, methods: Sequence[str] | None = None,
          alphas: Sequence[float] = SWEEP_ALPHAS, gatings: Sequence[str] = SWEEP_GATINGS,
          layers: str | None = None, progress: bool = True) -> list[dict]:
    """Plain steering vs DSAS over `alphas` on the shipped toy LM, one row per (method, gating, mode,
    alpha), in the row format of `benchmarks/toy_worlds.py`: world, concept, method, place, mode
    ("plain" / "dsas"), alpha, concept_rate, control_drift (= control_token_drift),
    control_faithful (= control_unchanged), plus every `evaluate_lm` field. `place` names the
    layers and the gating mode; plain rows (which have no gate) are repeated under each place.

    `args` (an argparse namespace) may carry `methods`; its `alphas` are not used, because the LM's
    useful strengths (1-6) differ from the image world's. Fitting sets: `fitting_sets()`."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..llm import fit_steering

    root = Path(__file__).resolve().parents[2]
    folder = Path(path) if path is not None else root / DEFAULT_ASSET
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    methods = list(methods or getattr(args, "methods", None) or ["mean_shift", "linear_act", "iti"])
    sets = fitting_sets()
    baseline = unsteered_baseline(model, tokenizer)
    base = evaluate_lm(model, tokenizer, baseline=baseline)
    if progress:
        print(f"[lm insult] unsteered: concept rate {base['concept_rate_source']:.2f} on source, "
              f"{base['concept_rate_control']:.2f} on control", flush=True)
    rows = []
    for method in methods:
        steering = fit_steering(model, tokenizer, sets.source, sets.target, sets.control, method=method,
                                layers=layers, progress=False)
        where = layers or "default layers"
        for alpha in alphas:
            plain = evaluate_lm(model, tokenizer, steering, alpha, gated=False, baseline=baseline)
            for gating in gatings:
                dsas = evaluate_lm(model, tokenizer, steering, alpha, gating=gating, baseline=baseline)
                for mode, r in (("plain", plain), ("dsas", dsas)):
                    rows.append({"world": "lm", "concept": "insult", "method": method,
                                 "place": f"{where}, {gating} gating", "mode": mode, "alpha": alpha,
                                 "concept_rate": r["concept_rate_source"], "control_drift": r["control_token_drift"],
                                 "control_faithful": r["control_unchanged"], **r})
        if progress:
            print(f"[lm insult] {method:<10} {len(steering.steered_layers)}/{len(steering.layers)} layers gated in",
                  flush=True)
    return rows


def _format(rows: list[dict]) -> str:
    keys = ("concept_rate_source", "source_polite", "control_unchanged", "control_kl", "lambda_source",
            "lambda_control")
    lines = ["method      place                            mode   alpha  " + "  ".join(k[:14].rjust(14) for k in keys)]
    for r in rows:
        lines.append(f"{r['method']:<11} {r['place']:<32} {r['mode']:<6} {r['alpha']:>5g}  "
                     + "  ".join(f"{r[k]:>14.3f}" for k in keys))
    return "\n".join(lines)


METHODS = ("mean_shift", "linear_act", "mean_act", "iti")


def main(argv: list[str] | None = None) -> None:
    """python -m dsas_diffusion.toy.lm_eval [method ...]: print a sweep (arguments parsed first)."""
    import argparse

    from ..cli import arguments as types

    parser = argparse.ArgumentParser(prog="python -m dsas_diffusion.toy.lm_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("methods", nargs="*", metavar="METHOD",
                        help="map families to sweep: mean_shift, linear_act, mean_act, iti (default: mean_shift "
                             "linear_act iti)")
    parser.add_argument("--threads", type=types.threads, default=1,
                        help="torch CPU threads (default: 1; results can differ in the last bits with another count)")
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"argument METHOD: {unknown[0]!r} is not a map family; choose from {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)
    print(_format(sweep(methods=args.methods or None)))


if __name__ == "__main__":
    main()
