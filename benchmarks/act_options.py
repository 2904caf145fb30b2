"""The maps as the AcT authors apply them, against the library's earlier rules, in the toy worlds.

    python -m benchmarks.act_options --quick   # fewer alphas
    python -m benchmarks.act_options
    python -m benchmarks.act_options --worlds lm   # one world (the other's rows in the results are kept)

Linear-AcT, plain steering (lambda = 1) and DSAS, on held-out prompts (concept rate on source
prompts against drift on control prompts, as benchmarks/toy_worlds.py measures them):

- toy LM (insult, default layers, causal gating): `outside_source_range` "clamp" vs "identity", each
  with the maps fitted at once on unsteered activations and fitted incrementally (`incremental=True`);
- toy images (red -> green): `outside_source_range` on the text encoder and on the UNet, and on the
  UNet `spatial_map` "per_position" vs "spatial_mean".

The options change how a fitted map is applied, not what is fitted, so each steering is fitted once
and applied under each option (a copy of its config with the option set). Writes
benchmarks/results/act_options.{json,md,png}.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from benchmarks.toy_worlds import ASSETS, DRIFT_LABELS, table, write_results

OUTSIDE = ("clamp", "identity")


def with_options(steering, **options):
    from dsas_diffusion import Steering

    return Steering(replace(steering.config, **options), steering.maps, steering.gates, steering.probes)


def lm_rows(args) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsas_diffusion.llm import fit_steering
    from dsas_diffusion.llm.fitting import collect_activations, refit_incrementally
    from dsas_diffusion.toy.lm_eval import evaluate_lm, unsteered_baseline
    from dsas_diffusion.toy.lm_world import fitting_sets

    model = AutoModelForCausalLM.from_pretrained(ASSETS / "toy-lm").eval()
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "toy-lm")
    sets, baseline, rows = fitting_sets(), unsteered_baseline(model, tokenizer), []
    at_once = fit_steering(model, tokenizer, sets.source, sets.target, sets.control, method="linear_act",
                           progress=False)
    pad = tokenizer.pad_token_id
    ids = {label: tokenizer(list(getattr(sets, label)))["input_ids"] for label in ("source", "target")}
    target = collect_activations(model, ids["target"], pad, at_once.layers, 8, progress=False,
                                 skip_first=at_once.config.skip_first_token)
    shares = share_inside(at_once, model, tokenizer, sets.source)
    print("[lm insult] share of source token values inside the source range, per layer: "
          + ", ".join(f"{v:.2f}" for v in shares.values()), flush=True)
    for outside in OUTSIDE:
        for incremental in (False, True):
            start = time.time()
            steering = with_options(at_once, outside_source_range=outside, incremental=incremental)
            if incremental:  # what fit_steering(incremental=True) does, through maps applied under this option
                steering = refit_incrementally(steering, model, ids["source"], pad, target, 8, progress=False)
            setting = f"linear_act, outside {outside}, {'incremental' if incremental else 'at once'}"
            for alpha in args.lm_alphas:
                for mode, gated in (("plain", False), ("dsas", True)):
                    r = evaluate_lm(model, tokenizer, steering, alpha, gated=gated, baseline=baseline)
                    rows.append({"world": "lm", "concept": "insult", "method": setting,
                                 "place": "default layers, causal gating", "mode": mode, "alpha": alpha,
                                 "concept_rate": r["concept_rate_source"], "control_drift": r["control_token_drift"],
                                 "control_faithful": r["control_unchanged"], "share_inside": shares, **r})
            print(f"[lm insult] {setting:<44} {time.time() - start:.0f} s", flush=True)
    return rows


def share_inside(steering, model, tokenizer, texts) -> dict[str, float]:
    """Per layer, the share of (token, unit) activation values of `texts` (real tokens after the first)
    inside the source range [lo, hi] of its Linear-AcT map: what `outside_source_range` leaves alone
    or clamps is the rest. The range is that of the per-text means the map was fitted on."""
    from dsas_diffusion.core.modules import get_module

    inside = {name: [] for name in steering.layers}
    handles = [get_module(model, name).register_forward_hook(
        lambda mod, inp, out, name=name: inside[name].append(
            ((out[0] if isinstance(out, tuple) else out)[:, 1:] >= steering.maps[name].lo)
            & ((out[0] if isinstance(out, tuple) else out)[:, 1:] <= steering.maps[name].hi)))
        for name in steering.layers]
    try:
        for text in texts:
            model(torch.tensor([tokenizer(text)["input_ids"]]))
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat([v.flatten() for v in values]).float().mean().item() for name, values in inside.items()}


def t2i_rows(args) -> list[dict]:
    from dsas_diffusion import DSASStableDiffusionPipeline
    from dsas_diffusion.toy.t2i_eval import concept_split, measure

    pipe = DSASStableDiffusionPipeline.from_pretrained(ASSETS / "toy-t2i")
    pipe.set_progress_bar_config(disable=True)
    seeds = list(range(args.seeds))
    split = concept_split("red", "green")
    base = measure(pipe, split, seeds, steps=args.steps)
    rows = []
    for place, spatial in (("text_encoder", ("per_position",)), ("unet", ("per_position", "spatial_mean"))):
        start = time.time()
        fitted = pipe.fit_steering(split.source, split.target, split.control, method="linear_act", steer=place,
                                   num_inference_steps=args.steps, progress=False)
        for outside in OUTSIDE:
            for spatial_map in spatial:
                steering = with_options(fitted, outside_source_range=outside, spatial_map=spatial_map)
                setting = f"linear_act, outside {outside}" + (f", {spatial_map}" if place == "unet" else "")
                for alpha in args.alphas:
                    for mode, gated in (("plain", False), ("dsas", True)):
                        r = measure(pipe, split, seeds, baseline=base, steps=args.steps, steering=steering,
                                    steering_strength=alpha, gated=gated)
                        rows.append({"world": "t2i", "concept": "red", "method": setting, "place": place,
                                     "mode": mode, "alpha": alpha,
                                     **{k: v for k, v in r.items() if not k.startswith("_")}})
        print(f"[t2i red] {place:<12} {len(fitted.steered_layers)}/{len(fitted.layers)} layers gated in, "
              f"{time.time() - start:.0f} s", flush=True)
    return rows


def plot(rows: list[dict], path) -> None:
    """One panel per (world, place, mode), one front per option setting, so the options compare in a panel."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from dsas_diffusion.core.io import atomic_path

    panels = list(dict.fromkeys((r["world"], r["place"], r["mode"]) for r in rows))
    cols = 2
    fig = Figure(figsize=(5.2 * cols, 3.6 * ((len(panels) + 1) // cols)), layout="constrained")
    axes = fig.subplots((len(panels) + 1) // cols, cols, squeeze=False).ravel()
    for ax, (world, place, mode) in zip(axes, panels):
        mine = [r for r in rows if (r["world"], r["place"], r["mode"]) == (world, place, mode)]
        for setting in dict.fromkeys(r["method"] for r in mine):
            pts = sorted((r for r in mine if r["method"] == setting), key=lambda r: r["alpha"])
            ax.plot([r["control_drift"] for r in pts], [r["concept_rate"] for r in pts], "o-", ms=3, alpha=0.8,
                    label=setting.replace("linear_act, ", ""))
            for r in pts:
                ax.annotate(f"{r['alpha']:g}", (r["control_drift"], r["concept_rate"]), fontsize=5,
                            xytext=(2, 2), textcoords="offset points")
        ax.set_title(f"{world} / {place} / {'plain steering' if mode == 'plain' else 'DSAS'}", fontsize=8)
        ax.set_xlabel(DRIFT_LABELS[world], fontsize=7)
        ax.set_ylabel("concept rate on held-out source prompts", fontsize=7)
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=6)
    for ax in axes[len(panels):]:
        ax.axis("off")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worlds", nargs="+", default=["lm", "t2i"], choices=["lm", "t2i"])
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    # both runs use the small image budget (2 seeds of 10 steps) of toy_worlds --quick, so that the
    # full run, with more alphas, fits about 20 minutes on 2 CPU cores
    args.seeds, args.steps = 2, 10
    args.alphas = [0.5, 1.0, 2.0] if args.quick else [0.5, 1.0, 2.0, 3.0]
    args.lm_alphas = [1.0, 2.0, 4.0] if args.quick else [1.0, 2.0, 3.0, 4.0, 6.0]
    rows = (lm_rows(args) if "lm" in args.worlds else []) + (t2i_rows(args) if "t2i" in args.worlds else [])
    name = "act_options" + ("_quick" if args.quick else "")
    write_results(name, rows, table, plot, worlds=args.worlds, settings=vars(args))


if __name__ == "__main__":
    main()
