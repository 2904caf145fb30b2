"""Pareto fronts of plain steering vs DSAS in the trained toy worlds, on held-out prompts.

    python -m benchmarks.toy_worlds --quick    # reduced sweep, a few minutes on 2 CPU cores
    python -m benchmarks.toy_worlds            # every map family x steering place x alpha
    python -m benchmarks.toy_worlds --learned  # the toy LM only: steering learned through the model
    python -m benchmarks.toy_worlds --conditional  # the toy images only: one concept's map, another's gate
    python -m benchmarks.toy_worlds --world dit    # the DiT (PixArt-Σ) world only, held-out phrasings apart
    python -m benchmarks.toy_worlds --shape-diagnosis [--world dit]  # why "circle" resists removal

For every (world, concept, method, place) and alpha, plain steering (lambda = 1) and DSAS are
measured on held-out prompts: concept rate on source prompts (lower is better) against damage on
control prompts (pixel drift from their unsteered twins; share still showing their caption).
Writes benchmarks/results/toy_pareto.json, toy_pareto.png and toy_pareto.md.

`--world dit` does the same in the DiT world (assets/toy-dit, trained on captions in several
phrasings): fitted on the fitting phrasings, measured on held-out scenes in the plain phrasing and,
in rows of their own, in held-out phrasings (synonyms, word order, relative clauses); places are
the T5 text encoder, the transformer's cross-attention, or both; writes toy_dit_pareto.*.

`--shape-diagnosis` separates the causes for a shape concept ("circle" -> "square"): plain steering
at every layer of each place (the map's reach, gates aside), and the gates' held-out accuracy per
layer at PCA rank 5, 10 and 20 (separability and rank); writes toy_shape_diagnosis_<world>.json / .md.

`--learned` compares, on the toy LM at its default layers with causal gating, two-stage DSAS
(Linear-AcT and mean shift, closed form) with what is learned through the model: LinEAS (plain,
and with two-stage gates: LinEAS + DSAS) and end-to-end gates (sigmoid and ReLU) on LinEAS and on
the mean shift; writes toy_learned.json / .md / .png.

`--conditional` reproduces the paper's image demonstration (a map applied only where the gate of
another concept fires) in the toy image world: the map turns red shapes green (fitted on red vs
green captions), the gate fires on circles (fitted on circle vs other captions), so held-out red
circles should turn green and red squares and triangles stay red. Fitting uses the white and black
backgrounds, measuring the grey one; writes toy_conditional.json and a figure toy_conditional.png.
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
                "dit": "control drift (mean |pixel change| vs unsteered)",
                "lm": "control drift (share of continuation tokens changed)"}


def _world(row: dict) -> str:
    """A row's world, with the prompts it was measured on where a world has several sets (DiT)."""
    return row["world"] + (f" ({row['prompts']})" if "prompts" in row else "")


def t2i_sweep(args) -> list[dict]:
    pipe, split_of, call, _, guidance = _image_world("t2i")
    return image_sweep(pipe, "t2i", split_of, args, call=call, guidance=guidance)


def dit_sweep(args) -> list[dict]:
    """The DiT world: fitted on the fitting phrasings; measured on held-out scenes in the plain phrasing
    and, separately, in held-out phrasings (rows' "prompts"). No lambda-floor mode (CPU time)."""
    pipe, split_of, call, denoiser, guidance = _image_world("dit")
    return image_sweep(pipe, "dit", split_of, args, call=call, guidance=guidance,
                       places=[denoiser if p == "unet" else p for p in args.places], floor=False)


def image_sweep(pipe, world: str, split_of, args, *, call: dict | None = None, guidance: float | None = None,
                places: list[str] | None = None, floor: bool = True) -> list[dict]:
    """Rows of plain steering and DSAS (and DSAS with a lambda floor) for every concept x method x place x
    alpha of `args`; `call`: arguments every pipeline call takes (fitting: as pipeline_kwargs); `guidance`:
    the world's guidance scale (None: measured at 4, fitted at the pipeline's default). Where a
    split has paraphrased prompts they are measured too, in rows whose "prompts" says so."""
    from dsas_diffusion import Steering
    from dsas_diffusion.toy.t2i_eval import measure

    call = dict(call or {})
    seeds = list(range(args.seeds))
    at = dict(steps=args.steps, **({"guidance": guidance} if guidance else {}), **call)
    rows = []
    for concept, replacement in args.concepts:
        split = split_of(concept, replacement)
        prompt_sets = {"held-out scenes": split}
        if split.paraphrased_source:
            prompt_sets["held-out phrasings"] = split.paraphrased()
        bases = {name: measure(pipe, s, seeds, **at) for name, s in prompt_sets.items()}
        for name, base in bases.items():
            print(f"[{world} {concept}] unsteered, {name}: concept rate {base['concept_rate']:.2f}, "
                  f"control faithful {base['control_faithful']:.2f}", flush=True)
        for method in args.methods:
            for place in places or args.places:
                start = time.time()
                try:
                    steering = pipe.fit_steering(split.source, split.target, split.control, method=method,
                                                 steer=place, num_inference_steps=args.steps, progress=False,
                                                 guidance_scale=guidance, **({"pipeline_kwargs": call} if call else {}))
                except ValueError as e:  # no gate passes the threshold: a result, not a crash
                    print(f"[{world} {concept}] {method:<10} {place:<12} not steerable: {str(e).splitlines()[0]}")
                    rows.append({"world": world, "concept": concept, "method": method, "place": place,
                                 "mode": "not steerable", "alpha": None, "gate_report": str(e)})
                    continue
                modes = [("plain", steering, False), ("dsas", steering, True)]
                if floor:
                    floored = Steering(replace(steering.config, lambda_floor=args.floor), steering.maps,
                                       steering.gates, steering.probes)
                    modes.append((f"dsas, lambda floor {args.floor:g}", floored, True))
                for mode, used, gated in modes:
                    for alpha in args.alphas:
                        for name, s in prompt_sets.items():
                            r = measure(pipe, s, seeds, baseline=bases[name], steering=used,
                                        steering_strength=alpha, gated=gated, **at)
                            rows.append({"world": world, "concept": concept, "method": method, "place": place,
                                         "mode": mode, "alpha": alpha,
                                         **({"prompts": name} if len(prompt_sets) > 1 else {}),
                                         **{k: v for k, v in r.items() if not k.startswith("_")}})
                print(f"[{world} {concept}] {method:<10} {place:<12} {len(steering.steered_layers)}/"
                      f"{len(steering.layers)} layers gated in, {time.time() - start:.0f} s", flush=True)
    return rows


def shape_diagnosis(args) -> list[dict]:
    """Why "circle" is hard to remove (circle -> square), one cause at a time:
    - the map and the steered place, gates aside: plain steering (lambda = 1) at every layer of the text
      encoder, the denoiser or both (accuracy_threshold 0, so no layer is left out), mean shift, and
      Linear-AcT in the text encoder;
    - the text encoder's separability and the gate's rank: each layer's held-out gate accuracy at PCA
      rank 5 (the default), 10 and 20, and DSAS with those gates (default threshold) where a layer passes."""
    from dsas_diffusion.toy.t2i_eval import measure

    pipe, split_of, call, denoiser, guidance = _image_world(args.world)
    guidance = guidance or 4.0  # fitted and measured at one guidance scale
    split = split_of("circle", "square")
    seeds = list(range(args.seeds))
    at = dict(steps=args.steps, guidance=guidance, **call)
    base = measure(pipe, split, seeds, **at)
    rows = [{"setting": "unsteered", "alpha": 0.0, **{k: v for k, v in base.items() if not k.startswith("_")}}]

    def fit(method: str, place: str, **options):
        return pipe.fit_steering(split.source, split.target, split.control, method=method, steer=place,
                                 num_inference_steps=args.steps, guidance_scale=guidance, progress=False,
                                 **({"pipeline_kwargs": call} if call else {}), **options)

    def accuracies(steering, setting: str) -> None:
        accuracy = {n: round(info.gate_accuracy, 3) for n, info in steering.config.layers.items()}
        print(f"[shape {args.world}] {setting}: held-out gate accuracy {accuracy}", flush=True)
        rows.append({"setting": setting, "alpha": None, "gate_accuracy": accuracy})

    def run(setting: str, steering, gated: bool) -> None:
        for alpha in args.alphas:
            r = measure(pipe, split, seeds, baseline=base, steering=steering, steering_strength=alpha, gated=gated,
                        **at)
            rows.append({"setting": setting, "alpha": alpha, "steered": len(steering.steered_layers),
                         **{k: v for k, v in r.items() if not k.startswith("_")}})
            print(f"[shape {args.world}] {setting:<48} alpha {alpha:g}: circle rate {r['concept_rate']:.2f}, "
                  f"control faithful {r['control_faithful']:.2f}", flush=True)

    for method, places in (("mean_shift", ("text_encoder", denoiser, "both")), ("linear_act", ("text_encoder",))):
        for place in places:
            every = fit(method, place, accuracy_threshold=0.0)
            if method == "mean_shift" and place != "both":
                accuracies(every, f"gate rank 5, {place}")
            run(f"plain, {method}, every {place} layer", every, False)
    for rank, places in ((10, ("text_encoder", denoiser)), (20, ("text_encoder",))):
        for place in places:
            every = fit("mean_shift", place, accuracy_threshold=0.0, pca_rank=rank)
            accuracies(every, f"gate rank {rank}, {place}")
            if max(i.gate_accuracy for i in every.config.layers.values()) >= every.config.accuracy_threshold:
                run(f"DSAS, mean_shift, {place}, gate rank {rank}", fit("mean_shift", place, pca_rank=rank), True)
    return rows


def _image_world(world: str):
    """(pipeline, split function, call arguments, denoiser place, guidance scale) of an image world."""
    from dsas_diffusion.toy.t2i_eval import concept_split, phrased_concept_split

    if world == "dit":
        from dsas_diffusion import DSASPixArtSigmaPipeline
        from dsas_diffusion.toy.train_dit import CALL_KWARGS, GUIDANCE

        pipe = DSASPixArtSigmaPipeline.from_pretrained(ASSETS / "toy-dit")
        split_of, call, denoiser, guidance = phrased_concept_split, CALL_KWARGS, "transformer", GUIDANCE
    else:
        from dsas_diffusion import DSASStableDiffusionPipeline

        pipe = DSASStableDiffusionPipeline.from_pretrained(ASSETS / "toy-t2i")
        split_of, call, denoiser, guidance = concept_split, {}, "unet", None
    pipe.set_progress_bar_config(disable=True)
    return pipe, split_of, call, denoiser, guidance


def shape_table(rows: list[dict]) -> str:
    lines = ["| setting | alpha | circle rate (held-out) | controls faithful | control drift |",
             "|---|---|---|---|---|"]
    for r in rows:
        if r["alpha"] is None:
            lines.append(f"| {r['setting']}: held-out gate accuracy per layer "
                         f"{', '.join(f'{v:.2f}' for v in r['gate_accuracy'].values())} | - | - | - | - |")
        else:
            lines.append(f"| {r['setting']} | {r['alpha']:g} | {r['concept_rate']:.2f} | {r['control_faithful']:.2f} "
                         f"| {r.get('control_drift', 0.0):.4f} |")
    return "\n".join(lines)


LEARNED = {  # setting -> fit_steering arguments
    "linear_act": dict(method="linear_act"),
    "mean_shift": dict(method="mean_shift"),
    "lineas": dict(method="lineas"),
    "mean_shift, e2e sigmoid": dict(method="mean_shift", gates="e2e"),
    "mean_shift, e2e relu": dict(method="mean_shift", gates="e2e", gate_activation="relu"),
    "lineas, e2e sigmoid": dict(method="lineas", gates="e2e"),
    "lineas, e2e relu": dict(method="lineas", gates="e2e", gate_activation="relu"),
}


def learned_sweep(args) -> list[dict]:
    """Rows of the toy LM for each setting of LEARNED: plain (lambda = 1) and DSAS for the two-stage
    gates, DSAS only for end-to-end ones (their gate is part of what was learned)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsas_diffusion.llm import fit_steering
    from dsas_diffusion.toy.lm_eval import evaluate_lm, unsteered_baseline
    from dsas_diffusion.toy.lm_world import fitting_sets

    model = AutoModelForCausalLM.from_pretrained(ASSETS / "toy-lm").eval()
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "toy-lm")
    sets, baseline, rows = fitting_sets(), unsteered_baseline(model, tokenizer), []
    training = {"steps": args.train_steps, "lr": args.lr}
    for setting, kwargs in LEARNED.items():
        # the toy LM's fitting texts are whole sentences the model ends at once, so continuations are
        # empty; floor 0 keeps two-stage and end-to-end gates comparable (this table was measured so)
        kwargs = dict(continuations=0, lambda_floor=0.0, **kwargs)
        learned = kwargs["method"] == "lineas" or kwargs.get("gates") == "e2e"
        start = time.time()
        steering = fit_steering(model, tokenizer, sets.source, sets.target, sets.control, progress=False, **kwargs,
                                **({"training": training} if learned else {}))
        fit_s = time.time() - start
        modes = (("dsas", True),) if kwargs.get("gates") == "e2e" else (("plain", False), ("dsas", True))
        for alpha in args.lm_alphas:
            for mode, gated in modes:
                r = evaluate_lm(model, tokenizer, steering, alpha, gated=gated, baseline=baseline)
                rows.append({"world": "lm", "concept": "insult", "method": setting,
                             "place": "default layers, causal gating", "mode": mode, "alpha": alpha,
                             "concept_rate": r["concept_rate_source"], "control_drift": r["control_token_drift"],
                             "control_faithful": r["control_unchanged"], "fit_s": fit_s,
                             "training": dict(steering.config.training), **r})
        print(f"[lm insult] {setting:<24} fitted in {fit_s:.0f} s {dict(steering.config.training)}", flush=True)
    return rows


def conditional_demo(args) -> dict:
    """Colour rates per held-out shape for unsteered, plain (map everywhere), DSAS with the map's own
    gate (red) and the conditional steering (circle gate); the images of one seed for the figure."""
    import numpy as np

    from dsas_diffusion import DSASStableDiffusionPipeline
    from dsas_diffusion.toy.t2i_eval import generate
    from dsas_diffusion.toy.t2i_world import SHAPES, all_scenes, colour_of

    pipe = DSASStableDiffusionPipeline.from_pretrained(ASSETS / "toy-t2i")
    pipe.set_progress_bar_config(disable=True)
    fitting = [s for s in all_scenes() if s.background != "grey"]
    held_out = {shape: [s.caption for s in all_scenes() if s.background == "grey" and s.colour == "red"
                        and s.shape == shape] for shape in SHAPES}
    red = [s.caption for s in fitting if s.colour == "red"]
    # pca_rank 10: the top 5 principal components of these captions are colour, size and background
    # directions, and a rank-5 circle gate scored 0.33-0.42 held-out accuracy (rank 10: 1.0).
    # gating "sequence": in a causal text encoder the colour word comes before the shape word, so
    # per-token gating cannot know the shape where the colour is read; measured with "token" gating
    # at alpha 2, the circle gate turned 100 % of held-out red squares and 50 % of red triangles green
    kw = dict(method=args.method, steer="text_encoder", num_inference_steps=args.steps, progress=False, pca_rank=10,
              gating="sequence")
    own = pipe.fit_steering(red, [c.replace(" red ", " green ") for c in red],
                            [s.caption for s in fitting if s.colour != "red"], **kw)
    conditional = pipe.fit_steering(red, [c.replace(" red ", " green ") for c in red],
                                    [s.caption for s in fitting if s.colour != "red"],
                                    gate_source=[s.caption for s in fitting if s.shape == "circle"],
                                    gate_control=[s.caption for s in fitting if s.shape != "circle"], **kw)
    modes = {"unsteered": {}, "plain": dict(steering=own, gated=False),
             "dsas, red gate": dict(steering=own), "conditional, circle gate": dict(steering=conditional)}
    seeds = list(range(args.seeds))
    result = {"alpha": args.alpha, "method": args.method, "rates": {}, "images": {}}
    for mode, call in modes.items():
        if call:
            call = dict(call, steering_strength=args.alpha)
        for shape, prompts in held_out.items():
            images = generate(pipe, prompts, seeds, args.steps, **call)
            read = [colour_of(i, "grey") for i in images]
            result["rates"][f"{mode} | red {shape}"] = {c: float(np.mean([r == c for r in read])) for c in
                                                        ("red", "green")}
            result["images"][(mode, shape)] = images[:: len(seeds)][0]
        print(f"[t2i conditional] {mode:<26} " + "  ".join(
            f"red {shape}: green {result['rates'][f'{mode} | red {shape}']['green']:.2f}" for shape in SHAPES),
            flush=True)
    result["layers"] = {"own gate": own.report(), "circle gate": conditional.report()}
    return result


def conditional_figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from dsas_diffusion.core.io import atomic_path

    modes = list(dict.fromkeys(m for m, _ in result["images"]))
    shapes = list(dict.fromkeys(s for _, s in result["images"]))
    fig = Figure(figsize=(1.6 * len(modes), 1.6 * len(shapes) + 0.4), layout="constrained")
    axes = fig.subplots(len(shapes), len(modes), squeeze=False)
    for i, shape in enumerate(shapes):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            ax.imshow(result["images"][(mode, shape)])
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(mode, fontsize=7)
            if j == 0:
                ax.set_ylabel(f"red {shape}", fontsize=7)
    fig.suptitle(f"map red -> green, gate 'circle' ({result['method']}, alpha {result['alpha']:g})", fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def table(rows: list[dict]) -> str:
    """Per setting and mode: the least control damage at which the concept rate falls to <= 10%."""
    lines = ["| world | concept | method | place | mode | concept rate at max alpha | least control drift with concept rate <= 0.1 | control still faithful / unchanged there | controls bit-identical there |",
             "|---|---|---|---|---|---|---|---|---|"]
    skipped = [r for r in rows if r["alpha"] is None]
    rows = [r for r in rows if r["alpha"] is not None]
    keys = sorted({(_world(r), r["concept"], r["method"], r["place"], r["mode"]) for r in rows})
    for key in keys:
        pts = [r for r in rows if (_world(r), r["concept"], r["method"], r["place"], r["mode"]) == key]
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


def write_results(name: str, rows: list[dict], table, plot, *, worlds=None, **extra) -> None:
    """`name`.json (NaN as null; `extra` fields first), .md (`table(rows)`) and .png (`plot`) in
    benchmarks/results. With `worlds`, the rows of other worlds already in the file are kept, so a
    run of one world does not erase another's."""
    from dsas_diffusion.core.io import write_text_atomic

    RESULTS.mkdir(exist_ok=True)
    if worlds is not None and (RESULTS / f"{name}.json").exists():
        rows = [r for r in json.loads((RESULTS / f"{name}.json").read_text())["rows"] if r["world"] not in worlds] + rows
    clean = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]
    write_text_atomic(RESULTS / f"{name}.json", json.dumps({**extra, "rows": clean}, indent=2, allow_nan=False) + "\n")
    md = table(rows)
    write_text_atomic(RESULTS / f"{name}.md", md + "\n")
    plot(rows, RESULTS / f"{name}.png")
    print(md)
    print(f"wrote {RESULTS / name}.json / .md / .png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from dsas_diffusion.core.io import atomic_path
    from dsas_diffusion.eval.pareto import place_labels

    rows = [r for r in rows if r["alpha"] is not None]
    settings = sorted({(_world(r), r["concept"], r["method"], r["place"]) for r in rows})
    cols = min(3, len(settings))
    nrows = (len(settings) + cols - 1) // cols
    fig = Figure(figsize=(4.2 * cols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    labels = []  # per axes: (x, y, alpha, colour), placed once every axes is drawn
    for ax, setting in zip(axes, settings):
        items = []
        modes = sorted({r["mode"] for r in rows if (_world(r), r["concept"], r["method"], r["place"]) == setting})
        for mode, colour in zip(sorted(modes, key=lambda m: (m != "plain", m)), ("tab:red", "tab:blue", "tab:green")):
            pts = sorted((r for r in rows if (_world(r), r["concept"], r["method"], r["place"]) == setting
                          and r["mode"] == mode), key=lambda r: r["alpha"])
            x = [r["control_drift"] for r in pts]
            y = [r["concept_rate"] for r in pts]
            ax.plot(x, y, "o-", color=colour, label="plain steering" if mode == "plain" else mode.replace("dsas", "DSAS"))
            items += [(r["control_drift"], r["concept_rate"], f"{r['alpha']:g}", colour) for r in pts]
        ax.set_title(" / ".join(setting), fontsize=8)
        ax.set_xlabel(DRIFT_LABELS[setting[0].split(" (")[0]], fontsize=7)
        ax.set_ylabel("concept rate on held-out source prompts", fontsize=7)
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=6)
        labels.append((ax, items))
    for ax in axes[len(settings):]:
        ax.axis("off")
    for ax, items in labels:
        place_labels(ax, items, fontsize=6)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def _concepts(text: str) -> list[tuple[str, str]]:
    pairs = [tuple(p.split(":")) for p in text.split(",")]
    if not pairs or any(len(p) != 2 or not all(p) for p in pairs):
        raise argparse.ArgumentTypeError(f"{text!r} is not concept:replacement[,...], e.g. red:green,circle:square")
    return pairs


def main(argv=None):
    from dsas_diffusion.cli import arguments as types

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--learned", action="store_true", help="the toy LM's learned steering only (see above)")
    parser.add_argument("--conditional", action="store_true",
                        help="the toy image world's conditional steering demonstration only (see above)")
    parser.add_argument("--train-steps", type=types.positive_int, default=1000,
                        help="with --learned: training steps (default 1000, the authors')")
    parser.add_argument("--lr", type=types.learning_rate, default=1e-3,
                        help="with --learned: learning rate (default 1e-3, the authors')")
    parser.add_argument("--world", choices=("t2i", "dit"), default=None,
                        help="one image world only: t2i (the UNet) or dit (the PixArt-Σ world; writes toy_dit_pareto)")
    parser.add_argument("--shape-diagnosis", action="store_true",
                        help="why 'circle' resists removal, in --world (default t2i); writes toy_shape_diagnosis_*")
    parser.add_argument("--seeds", type=types.positive_int, default=None, help="seeds per prompt (default 3; quick 2)")
    parser.add_argument("--steps", type=types.positive_int, default=None,
                        help="denoising steps (default 20; quick 10)")
    parser.add_argument("--concepts", type=_concepts, default=None,
                        help="image concepts as concept:replacement,... (default red:green,circle:square; "
                        "quick red:green)")
    parser.add_argument("--threads", type=types.threads, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    args.floor = 0.05
    args.seeds = args.seeds or (2 if args.quick else 3)
    args.steps = args.steps or (10 if args.quick else 20)
    args.alphas = [0.5, 1.0, 2.0] if args.quick else [0.5, 1.0, 2.0, 3.0]
    args.methods = ["mean_shift", "linear_act"] if args.quick else ["mean_shift", "linear_act", "iti"]
    args.places = ["text_encoder"] if args.quick else ["text_encoder", "unet", "both"]
    args.concepts = args.concepts or ([("red", "green")] if args.quick else [("red", "green"), ("circle", "square")])
    # learned maps match the target at every layer jointly, where closed-form maps fitted on unsteered
    # activations overshoot downstream (measured: 30x the unsteered Wasserstein loss at the toy LM's
    # last layer for a mean shift at alpha 1, 0.1x for LinEAS), so their useful strengths are larger
    args.lm_alphas = [1.0, 2.0, 4.0, 8.0, 16.0] if args.quick else [1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0]
    from dsas_diffusion.core.io import write_text_atomic

    if args.conditional:
        args.alpha, args.method = 0.5, "mean_shift"
        result = conditional_demo(args)
        RESULTS.mkdir(exist_ok=True)
        name = "toy_conditional" + ("_quick" if args.quick else "")
        conditional_figure(result, RESULTS / f"{name}.png")
        keep = {k: v for k, v in result.items() if k != "images"}
        write_text_atomic(RESULTS / f"{name}.json", json.dumps(keep, indent=2) + "\n")
        print(f"wrote {RESULTS / name}.json / .png")
        return
    if args.shape_diagnosis:
        args.world, args.alphas = args.world or "t2i", [1.0, 2.0, 4.0]
        rows = shape_diagnosis(args)
        RESULTS.mkdir(exist_ok=True)
        name = f"toy_shape_diagnosis_{args.world}" + ("_quick" if args.quick else "")
        write_text_atomic(RESULTS / f"{name}.json", json.dumps({"settings": vars(args), "rows": rows}, indent=2) + "\n")
        write_text_atomic(RESULTS / f"{name}.md", shape_table(rows) + "\n")
        print(shape_table(rows))
        print(f"wrote {RESULTS / name}.json / .md")
        return
    from dsas_diffusion.toy.lm_eval import sweep as lm_sweep

    if args.learned:
        rows, name = learned_sweep(args), "toy_learned"
    elif args.world == "dit":
        rows, name = dit_sweep(args), "toy_dit_pareto"
    elif args.world == "t2i":
        rows, name = t2i_sweep(args), "toy_t2i_pareto"
    else:
        rows, name = t2i_sweep(args) + lm_sweep(args), "toy_pareto"
    name += "_quick" if args.quick else ""
    write_results(name, rows, table, plot, settings=vars(args))


if __name__ == "__main__":
    main()
