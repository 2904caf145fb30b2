"""Pareto fronts of plain steering vs DSAS in the trained toy worlds, on held-out prompts.

    python -m benchmarks.toy_worlds --quick    # reduced sweep, a few minutes on 2 CPU cores
    python -m benchmarks.toy_worlds            # every map family x steering place x alpha

For every (world, concept, method, place) and alpha, plain steering (lambda = 1) and DSAS are
measured on held-out prompts: concept rate on source prompts (lower is better) against damage on
control prompts (pixel drift from their unsteered twins; share still showing their caption).
Writes benchmarks/results/toy_pareto.json, toy_pareto.png and toy_pareto.md.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
ASSETS = Path(__file__).resolve().parents[1] / "assets"
DRIFT_LABELS = {"t2i": "control drift (mean |pixel change| vs unsteered)",
                "lm": "control drift (share of continuation tokens changed)"}


def t2i_sweep(args) -> list[dict]:
    from dsas_diffusion import DSASStableDiffusionPipeline, Steering
    from dsas_diffusion.toy.t2i_eval import concept_split, measure

    pipe = DSASStableDiffusionPipeline.from_pretrained(ASSETS / "toy-t2i")
    pipe.set_progress_bar_config(disable=True)
    seeds = list(range(args.seeds))
    rows = []
    for concept, replacement in args.concepts:
        split = concept_split(concept, replacement)
        base = measure(pipe, split, seeds, steps=args.steps)
        print(f"[t2i {concept}] unsteered: concept rate {base['concept_rate']:.2f}, "
              f"control faithful {base['control_faithful']:.2f}", flush=True)
        for method in args.methods:
            for place in args.places:
                start = time.time()
                try:
                    steering = pipe.fit_steering(split.source, split.target, split.control, method=method,
                                                 steer=place, num_inference_steps=args.steps, progress=False)
                except ValueError as e:  # no gate passes the threshold: a result, not a crash
                    print(f"[t2i {concept}] {method:<10} {place:<12} not steerable: {str(e).splitlines()[0]}")
                    rows.append({"world": "t2i", "concept": concept, "method": method, "place": place,
                                 "mode": "not steerable", "alpha": None, "gate_report": str(e)})
                    continue
                floored = Steering(replace(steering.config, lambda_floor=args.floor), steering.maps, steering.gates,
                                   steering.probes)
                for mode, used, gated in (("plain", steering, False), ("dsas", steering, True),
                                          (f"dsas, lambda floor {args.floor:g}", floored, True)):
                    for alpha in args.alphas:
                        r = measure(pipe, split, seeds, baseline=base, steps=args.steps, steering=used,
                                    steering_strength=alpha, gated=gated)
                        rows.append({"world": "t2i", "concept": concept, "method": method, "place": place,
                                     "mode": mode, "alpha": alpha,
                                     **{k: v for k, v in r.items() if not k.startswith("_")}})
                print(f"[t2i {concept}] {method:<10} {place:<12} {len(steering.steered_layers)}/"
                      f"{len(steering.layers)} layers gated in, {time.time() - start:.0f} s", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Per setting and mode: the least control damage at which the concept rate falls to <= 10%."""
    lines = ["| world | concept | method | place | mode | concept rate at max alpha | least control drift with concept rate <= 0.1 | control still faithful / unchanged there | controls bit-identical there |",
             "|---|---|---|---|---|---|---|---|---|"]
    skipped = [r for r in rows if r["alpha"] is None]
    rows = [r for r in rows if r["alpha"] is not None]
    keys = sorted({(r["world"], r["concept"], r["method"], r["place"], r["mode"]) for r in rows})
    for key in keys:
        pts = [r for r in rows if (r["world"], r["concept"], r["method"], r["place"], r["mode"]) == key]
        top = max(pts, key=lambda r: r["alpha"])
        ok = [r for r in pts if r["concept_rate"] <= 0.1]
        best = min(ok, key=lambda r: r["control_drift"]) if ok else None
        lines.append("| " + " | ".join(key) + f" | {top['concept_rate']:.2f} | " +
                     (f"{best['control_drift']:.4f} (alpha {best['alpha']:g}) | {best['control_faithful']:.2f} | "
                      + (f"{best['control_identical']:.2f}" if "control_identical" in best else "-")
                      if best else "not reached | - | -") + " |")
    for r in skipped:
        lines.append(f"| {r['world']} | {r['concept']} | {r['method']} | {r['place']} | - | no layer's gate reaches "
                     "the accuracy threshold: nothing to steer | - | - | - |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from dsas_diffusion.core.io import atomic_path

    rows = [r for r in rows if r["alpha"] is not None]
    settings = sorted({(r["world"], r["concept"], r["method"], r["place"]) for r in rows})
    cols = min(3, len(settings))
    nrows = (len(settings) + cols - 1) // cols
    fig = Figure(figsize=(4.2 * cols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, setting in zip(axes, settings):
        modes = sorted({r["mode"] for r in rows if (r["world"], r["concept"], r["method"], r["place"]) == setting})
        for mode, colour in zip(sorted(modes, key=lambda m: (m != "plain", m)), ("tab:red", "tab:blue", "tab:green")):
            pts = sorted((r for r in rows if (r["world"], r["concept"], r["method"], r["place"]) == setting
                          and r["mode"] == mode), key=lambda r: r["alpha"])
            x = [r["control_drift"] for r in pts]
            y = [r["concept_rate"] for r in pts]
            ax.plot(x, y, "o-", color=colour, label="plain steering" if mode == "plain" else mode.replace("dsas", "DSAS"))
            for r in pts:
                ax.annotate(f"{r['alpha']:g}", (r["control_drift"], r["concept_rate"]), fontsize=6,
                            xytext=(2, 2), textcoords="offset points")
        ax.set_title(" / ".join(setting), fontsize=8)
        ax.set_xlabel(DRIFT_LABELS[setting[0]], fontsize=7)
        ax.set_ylabel("concept rate on held-out source prompts", fontsize=7)
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=6)
    for ax in axes[len(settings):]:
        ax.axis("off")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def main(argv=None):
    from dsas_diffusion.cli import arguments as types

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=types.threads, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    args.floor = 0.05
    args.seeds = 2 if args.quick else 3
    args.steps = 10 if args.quick else 20
    args.alphas = [0.5, 1.0, 2.0] if args.quick else [0.5, 1.0, 2.0, 3.0]
    args.methods = ["mean_shift", "linear_act"] if args.quick else ["mean_shift", "linear_act", "iti"]
    args.places = ["text_encoder"] if args.quick else ["text_encoder", "unet", "both"]
    args.concepts = [("red", "green")] if args.quick else [("red", "green"), ("circle", "square")]
    from dsas_diffusion.toy.lm_eval import sweep as lm_sweep

    rows = t2i_sweep(args) + lm_sweep(args)
    from dsas_diffusion.core.io import write_text_atomic

    RESULTS.mkdir(exist_ok=True)
    name = "toy_pareto_quick" if args.quick else "toy_pareto"
    clean = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]
    write_text_atomic(RESULTS / f"{name}.json", json.dumps({"settings": vars(args), "rows": clean}, indent=2,
                                                          allow_nan=False) + "\n")
    md = table(rows)
    write_text_atomic(RESULTS / f"{name}.md", md + "\n")
    plot(rows, RESULTS / f"{name}.png")
    print(md)
    print(f"wrote {RESULTS / name}.json / .md / .png")


if __name__ == "__main__":
    main()
