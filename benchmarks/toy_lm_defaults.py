"""The language-model defaults of `fit_steering` (continuations=32, lambda_floor=0.9, issue 12) against the
old ones (0, 0) in the toy LM world, on held-out prompts.

    python -m benchmarks.toy_lm_defaults            # mean shift
    python -m benchmarks.toy_lm_defaults --methods mean_shift linear_act

The shipped toy LM (assets/toy-lm) is fitted twice per map family, on the fitting texts alone and on
them followed by the model's own greedy continuations (identical fits are measured once: the toy
world's fitting texts are whole sentences, which the model ends at once); each fit is measured with
DSAS (causal gating, the default) at floor 0 and 0.9 (a run-time option, so no refit) and plain steering,
over alpha: concept rate, polite and well-formed answers on held-out source prompts, held-out control
continuations exactly unchanged, their KL and mean lambdas (`dsas_diffusion.toy.lm_eval.evaluate_lm`).
Writes benchmarks/results/toy_lm_defaults.{json,md,png}.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.toy_worlds import ASSETS, plot, write_results

ALPHAS = (1.0, 2.0, 3.0, 3.5, 4.0, 6.0, 8.0)
FITS = {"continuations 0": 0, "continuations 32": 32}  # label -> fit_steering(continuations=)
FLOORS = (0.0, 0.9)
DEFAULTS = ("continuations 32, floor 0.9", "continuations 0 = continuations 32, floor 0.9")  # fit_steering's defaults


def rows_of(methods, alphas) -> tuple[list[dict], dict]:
    """(the rows, the unsteered model's measures)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsas_diffusion.llm import fit_steering
    from dsas_diffusion.toy.lm_eval import evaluate_lm, unsteered_baseline
    from dsas_diffusion.toy.lm_world import fitting_sets

    model = AutoModelForCausalLM.from_pretrained(ASSETS / "toy-lm").eval()
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "toy-lm")
    sets, baseline, rows = fitting_sets(), unsteered_baseline(model, tokenizer), []
    unsteered = {k: v for k, v in evaluate_lm(model, tokenizer, baseline=baseline).items() if v == v}  # no NaN lambdas
    for method in methods:
        fits = {}
        for fit, continuations in FITS.items():
            start = time.time()
            fits[fit] = steering = fit_steering(model, tokenizer, sets.source, sets.target, sets.control,
                                                method=method, continuations=continuations, progress=False)
            print(f"[toy lm] {method} {fit}: fitted in {time.time() - start:.0f} s, "
                  f"{len(steering.steered_layers)}/{len(steering.layers)} layers steered", flush=True)
        a, b = (f.state_dict() for f in fits.values())
        if a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a):
            # every fitting text of the toy world is a whole sentence, which the model ends at once
            print(f"[toy lm] {method}: the fits are identical (the continuations add no token); measured once",
                  flush=True)
            fits = {" = ".join(FITS): fits[list(FITS)[-1]]}
        for fit, steering in fits.items():
            for alpha in alphas:
                plain = evaluate_lm(model, tokenizer, steering, alpha, gated=False, baseline=baseline)
                for floor in FLOORS:  # plain rows repeated under each floor: one panel per setting in the plot
                    dsas = evaluate_lm(model, tokenizer, steering, alpha, lambda_floor=floor, baseline=baseline)
                    for mode, r in (("plain", plain), ("dsas", dsas)):
                        rows.append({"world": "lm", "concept": "insult", "method": method,
                                     "place": f"{fit}, floor {floor:g}", "mode": mode, "alpha": alpha,
                                     "concept_rate": r["concept_rate_source"],
                                     "control_drift": r["control_token_drift"],
                                     "control_faithful": r["control_unchanged"], **r})
                    print(f"[toy lm] {method} {fit}, floor {floor:g}, alpha {alpha:g}: DSAS concept "
                          f"{dsas['concept_rate_source']:.2f}, controls unchanged {dsas['control_unchanged']:.2f}; "
                          f"plain {plain['concept_rate_source']:.2f}, {plain['control_unchanged']:.2f}", flush=True)
    return rows, unsteered


def _setting(row: dict) -> str:
    """The row's setting as the table names it: plain steering has no floor; the defaults are marked."""
    if row["mode"] == "plain":
        return row["place"].split(", floor")[0]
    return row["place"] + (" (the default)" if row["place"] in DEFAULTS else "")


def table(rows: list[dict]) -> str:
    """Every measured point (plain steering once per fit), then per setting the most controls unchanged with
    the concept rate <= 10 %."""
    rows = [r for r in rows if r["mode"] == "dsas" or r["place"].endswith(f"floor {FLOORS[0]:g}")]
    keys = ("concept_rate_source", "source_polite", "source_well_formed", "control_unchanged", "control_kl",
            "lambda_source", "lambda_control")
    lines = ["| method | setting | mode | alpha | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
             "|---|---|---|---|" + "---|" * len(keys)]
    for r in rows:
        lines.append(f"| {r['method']} | {_setting(r)} | {r['mode']} | {r['alpha']:g} | "
                     + " | ".join(f"{r[k]:.4f}" if k == "control_kl" else f"{r[k]:.3f}" for k in keys) + " |")
    lines += ["", "| method | setting | mode | best alpha (concept rate <= 0.1) | concept rate | source polite | "
              "controls unchanged |", "|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["method"], _setting(r), r["mode"]) for r in rows):
        ok = [r for r in rows if (r["method"], _setting(r), r["mode"]) == key and r["concept_rate"] <= 0.1]
        best = max(ok, key=lambda r: (r["control_faithful"], -r["alpha"])) if ok else None
        lines.append(f"| {' | '.join(key)} | " + (
            f"{best['alpha']:g} | {best['concept_rate']:.2f} | {best['source_polite']:.2f} | "
            f"{best['control_faithful']:.2f} |" if best else "not reached | - | - | - |"))
    return "\n".join(lines)


def main(argv=None):
    from dsas_diffusion.cli import arguments as types

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["mean_shift"], help="map families (default: mean_shift)")
    parser.add_argument("--alphas", nargs="+", type=float, default=list(ALPHAS), help=f"strengths (default {ALPHAS})")
    parser.add_argument("--threads", type=types.threads, default=1, help="torch CPU threads (default: 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    start = time.time()
    rows, unsteered = rows_of(args.methods, args.alphas)
    wall_s = round(time.time() - start)
    head = (f"`python -m benchmarks.toy_lm_defaults --methods {' '.join(args.methods)}`: {wall_s} s on "
            f"{args.threads} thread(s). 48 + 48 held-out prompts, greedy; unsteered: concept rate "
            f"{unsteered['concept_rate_source']:.2f} on source prompts, {unsteered['concept_rate_control']:.2f} "
            "on control prompts.\n\n")
    write_results("toy_lm_defaults", rows, lambda rows: head + table(rows), plot, settings=vars(args),
                  wall_s=wall_s, unsteered=unsteered)


if __name__ == "__main__":
    main()
