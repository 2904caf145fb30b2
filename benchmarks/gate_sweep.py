"""How DSAS's Pareto fronts move with the gate's settings, in the toy worlds (the reviewers' question).

    python -m benchmarks.gate_sweep --quick    # fewer settings, smaller alphas on the LM
    python -m benchmarks.gate_sweep
    python -m benchmarks.gate_sweep --worlds lm   # one world (the other's rows in the results are kept)

On held-out prompts of the toy LM (insult, mean shift at the default layers; `LM_FIT`) and of
the toy images (red -> green, mean shift on the text encoder), DSAS is measured over alpha for:

- `pca_rank` of the gate (each a fit of its own);
- `accuracy_threshold`, the held-out gate accuracy a layer needs to be steered;
- `accuracy_scaling` (each layer's map weighed by its gate's accuracy, 0 at chance) instead of it;
- `cv_folds`: layers scored by 5-fold cross-validation over prompts instead of one 25 % split.

The threshold and the scaling only decide, from the accuracies a fit measured, which layers are
steered and how much, so one fit per (pca_rank, cv_folds) serves every threshold and scaling
(`rethresholded`, the rule of core/fit.py). Writes benchmarks/results/gate_sweep.{json,md,png}.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from benchmarks.toy_worlds import ASSETS, DRIFT_LABELS, write_results

DEFAULT = dict(pca_rank=5, cv_folds=0, accuracy_threshold=0.75, accuracy_scaling=False)
# The LM fits pin what the library's language-model defaults would otherwise move under the sweep: causal
# gating, no lambda floor and no continuations (the options of the toy-LM figures before the defaults
# moved; continuations add nothing in this world, whose fitting texts the model ends at once), so a row
# differs from the defaults' row in the one gate setting it names.
LM_FIT = dict(gating="causal", lambda_floor=0.0, continuations=0)


def settings(quick: bool) -> list[dict]:
    """The gate settings: the defaults, then one parameter moved at a time."""
    ranks = (2, 16) if quick else (1, 2, 10, 16, 20)  # 16: the language models' default
    thresholds = (0.6, 0.9) if quick else (0.5, 0.6, 0.9, 0.95)
    out = [dict(DEFAULT)]
    out += [dict(DEFAULT, pca_rank=r) for r in ranks]
    out += [dict(DEFAULT, accuracy_threshold=t) for t in thresholds]
    out += [dict(DEFAULT, accuracy_scaling=True)]
    out += [dict(DEFAULT, cv_folds=5), dict(DEFAULT, cv_folds=5, accuracy_scaling=True)]
    return out


def label(setting: dict) -> str:
    moved = [f"{k}={v}" for k, v in setting.items() if v != DEFAULT[k]]
    return ", ".join(moved) or "defaults (rank 5, threshold 0.75, one split)"


def rethresholded(steering, threshold: float, scaling: bool):
    """`steering` (fitted with threshold 0, so every layer is kept) with the layers a fit at this threshold
    or with accuracy scaling would steer, and the maps it would weigh; None when no layer is steered."""
    from dsas_diffusion import Steering
    from dsas_diffusion.core.fit import accuracy_weight

    layers, maps = {}, {}
    for name, info in steering.config.layers.items():
        acc = info.gate_accuracy
        steered = acc != acc or (acc > 0.5 if scaling else acc >= threshold)
        layers[name] = replace(info, steered=bool(steered))
        maps[name] = steering.maps[name].scaled(accuracy_weight(acc)) if scaling else steering.maps[name]
    if not any(info.steered for info in layers.values()):
        return None
    config = replace(steering.config, accuracy_threshold=threshold, accuracy_scaling=scaling, layers=layers)
    return Steering(config, maps, steering.gates, steering.probes)


def gate_facts(steering) -> dict:
    infos = list(steering.config.layers.values())
    accs = [i.gate_accuracy for i in infos if i.gate_accuracy == i.gate_accuracy]
    stds = [i.gate_accuracy_std for i in infos if i.gate_accuracy_std == i.gate_accuracy_std]
    return {"layers_steered": sum(i.steered for i in infos), "layers": len(infos),
            "accuracy_mean": sum(accs) / len(accs) if accs else None,
            "accuracy_fold_std_mean": sum(stds) / len(stds) if stds else None}


def sweep(world: str, fit, evaluate, alphas, quick: bool) -> list[dict]:
    """Rows for every gate setting of `settings`: `fit(pca_rank, cv_folds)` -> steering fitted at threshold 0,
    `evaluate(steering, alpha)` -> (concept rate, control drift, control faithful)."""
    fits, rows = {}, []
    for setting in settings(quick):
        key = (setting["pca_rank"], setting["cv_folds"])
        if key not in fits:
            start = time.time()
            fits[key] = fit(*key)
            print(f"[{world}] fitted pca_rank={key[0]} cv_folds={key[1]} in {time.time() - start:.0f} s", flush=True)
        steering = rethresholded(fits[key], setting["accuracy_threshold"], setting["accuracy_scaling"])
        base = {"world": world, "setting": label(setting), **setting}
        if steering is None:
            rows.append({**base, "alpha": None, **gate_facts(fits[key]), "layers_steered": 0})
            continue
        for alpha in alphas:
            rate, drift, faithful = evaluate(steering, alpha)
            rows.append({**base, "alpha": alpha, "concept_rate": rate, "control_drift": drift,
                         "control_faithful": faithful, **gate_facts(steering)})
        print(f"[{world}] {label(setting):<48} {gate_facts(steering)}", flush=True)
    return rows


def lm_rows(args) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsas_diffusion.llm import fit_steering
    from dsas_diffusion.toy.lm_eval import evaluate_lm, unsteered_baseline
    from dsas_diffusion.toy.lm_world import fitting_sets

    model = AutoModelForCausalLM.from_pretrained(ASSETS / "toy-lm").eval()
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "toy-lm")
    sets, baseline = fitting_sets(), unsteered_baseline(model, tokenizer)

    def fit(rank, folds):
        return fit_steering(model, tokenizer, sets.source, sets.target, sets.control, method="mean_shift",
                            pca_rank=rank, cv_folds=folds, accuracy_threshold=0.0, progress=False, **LM_FIT)

    def evaluate(steering, alpha):
        r = evaluate_lm(model, tokenizer, steering, alpha, baseline=baseline)
        return r["concept_rate_source"], r["control_token_drift"], r["control_unchanged"]

    return sweep("lm", fit, evaluate, args.lm_alphas, args.quick)


def t2i_rows(args) -> list[dict]:
    from dsas_diffusion import DSASStableDiffusionPipeline
    from dsas_diffusion.toy.t2i_eval import concept_split, measure

    pipe = DSASStableDiffusionPipeline.from_pretrained(ASSETS / "toy-t2i")
    pipe.set_progress_bar_config(disable=True)
    seeds = list(range(args.seeds))
    split = concept_split("red", "green")
    base = measure(pipe, split, seeds, steps=args.steps)

    def fit(rank, folds):
        return pipe.fit_steering(split.source, split.target, split.control, method="mean_shift", steer="text_encoder",
                                 num_inference_steps=args.steps, pca_rank=rank, cv_folds=folds,
                                 accuracy_threshold=0.0, progress=False)

    def evaluate(steering, alpha):
        r = measure(pipe, split, seeds, baseline=base, steps=args.steps, steering=steering, steering_strength=alpha)
        return r["concept_rate"], r["control_drift"], r["control_faithful"]

    return sweep("t2i", fit, evaluate, args.alphas, args.quick)


def table(rows: list[dict]) -> str:
    """Per world and gate setting: the gates, the concept rate at the largest alpha, and the least control
    drift at which the concept rate falls to <= 0.1 (the front's knee)."""
    lines = ["| world | gate setting | layers steered | mean held-out gate accuracy | its spread over folds | "
             "concept rate at max alpha | least control drift with concept rate <= 0.1 | control faithful there |",
             "|---|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["world"], r["setting"]) for r in rows))
    for world, setting in keys:
        pts = [r for r in rows if (r["world"], r["setting"]) == (world, setting)]
        facts = pts[0]
        acc = "-" if facts["accuracy_mean"] is None else f"{facts['accuracy_mean']:.3f}"
        spread = "-" if facts["accuracy_fold_std_mean"] is None else f"{facts['accuracy_fold_std_mean']:.3f}"
        head = f"| {world} | {setting} | {facts['layers_steered']}/{facts['layers']} | {acc} | {spread} | "
        if facts["alpha"] is None:
            lines.append(head + "no layer steered | - | - |")
            continue
        top = max(pts, key=lambda r: r["alpha"])
        ok = [r for r in pts if r["concept_rate"] <= 0.1]
        best = min(ok, key=lambda r: (r["control_drift"], r["alpha"])) if ok else None
        lines.append(head + f"{top['concept_rate']:.2f} | " + (
            f"{best['control_drift']:.4f} (alpha {best['alpha']:g}) | {best['control_faithful']:.2f} |"
            if best else "not reached | - |"))
    return "\n".join(lines)


def plot(rows: list[dict], path) -> None:
    """One panel per (world, parameter moved): the default front and the fronts with that parameter moved."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from dsas_diffusion.core.io import atomic_path

    groups = {"pca_rank": lambda s: s["pca_rank"] != 5,
              "accuracy_threshold": lambda s: s["accuracy_threshold"] != 0.75,
              "accuracy_scaling / cv_folds": lambda s: s["accuracy_scaling"] or s["cv_folds"]}
    worlds = list(dict.fromkeys(r["world"] for r in rows))
    fig = Figure(figsize=(4.4 * len(groups), 3.5 * len(worlds)), layout="constrained")
    axes = fig.subplots(len(worlds), len(groups), squeeze=False)
    for i, world in enumerate(worlds):
        for j, (group, moved) in enumerate(groups.items()):
            ax = axes[i][j]
            shown = [s for s in dict.fromkeys(r["setting"] for r in rows if r["world"] == world)
                     if s.startswith("defaults") or moved(next(r for r in rows if r["setting"] == s))]
            for setting in shown:
                pts = sorted((r for r in rows if r["world"] == world and r["setting"] == setting
                              and r["alpha"] is not None), key=lambda r: r["alpha"])
                if not pts:
                    continue
                style = "k-o" if setting.startswith("defaults") else "-o"
                ax.plot([r["control_drift"] for r in pts], [r["concept_rate"] for r in pts], style, ms=3,
                        label=setting.split(" (")[0], alpha=0.85)
                for r in pts:
                    ax.annotate(f"{r['alpha']:g}", (r["control_drift"], r["concept_rate"]), fontsize=5,
                                xytext=(2, 2), textcoords="offset points")
            ax.set_title(f"{world}: {group}", fontsize=8)
            ax.set_xlabel(DRIFT_LABELS[world], fontsize=7)
            ax.set_ylabel("concept rate on held-out source prompts", fontsize=7)
            ax.set_ylim(-0.05, 1.05)
            ax.legend(fontsize=6)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worlds", nargs="+", default=["lm", "t2i"], choices=["lm", "t2i"])
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    # the full run moves every parameter further; both use the small image budget (2 seeds of 10
    # steps) of toy_worlds --quick, so that the full run fits about half an hour on 2 CPU cores
    args.seeds, args.steps = 2, 10
    args.alphas = [0.5, 1.0, 2.0]
    # the toy LM's mean shift leaves 0.85 of the source continuations insulting at alpha 4 (--quick run)
    args.lm_alphas = [1.0, 2.0, 4.0] if args.quick else [4.0, 8.0, 16.0]
    rows = (lm_rows(args) if "lm" in args.worlds else []) + (t2i_rows(args) if "t2i" in args.worlds else [])
    name = "gate_sweep" + ("_quick" if args.quick else "")
    write_results(name, rows, table, plot, worlds=args.worlds, settings=vars(args), lm_fit=LM_FIT)


if __name__ == "__main__":
    main()
