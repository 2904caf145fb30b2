"""`dsas sweep`: plain steering and DSAS over a grid of strengths alpha, on concept and control
prompts, scored like `dsas eval`; the result is a Pareto front of concept rate (concept prompts,
lower is better) against drift (control prompts, lower is better): pareto.json, pareto.png, pareto.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import arguments as types
from .common import (CLIError, add_clip_args, add_generation_args, add_output_args, add_prompt_args,
                     add_runtime_args, concept_texts, device_for, echo, load_clip_model, process_state, torch_dtype,
                     warn)

DRIFTS = {"clip": ("drift_clip", "drift of control images (1 - CLIP cosine to unsteered)"),
          "pixel": ("drift_pixel", "drift of control images (mean |pixel change| vs unsteered)")}
CONCEPT_METRICS = {"rate": ("concept_rate", "concept rate on concept prompts"),
                   "prob": ("concept_prob", "mean P(concept) on concept prompts")}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sweep", help="alpha grid for plain steering and DSAS -> Pareto front",
        description="Generate concept and control prompts unsteered and with plain steering and DSAS at every alpha, "
                    "score them, and write the Pareto front of concept rate against control drift (pareto.json, "
                    "pareto.png, pareto.md) next to results.jsonl, scores.jsonl and summary.md. Resumable.")
    add_generation_args(p)
    add_prompt_args(p)
    p.add_argument("--alphas", type=types.strengths, default="0.25,0.5,1,2",
                   help="steering strengths, comma-separated (default: 0.25,0.5,1,2)")
    add_clip_args(p)
    p.add_argument("--drift", choices=sorted(DRIFTS), default="clip", help="drift measure of the front (default: clip)")
    p.add_argument("--concept-metric", choices=sorted(CONCEPT_METRICS), default="rate",
                   help="rate: fraction of images showing the concept; prob: mean P(concept) (default: rate)")
    add_output_args(p)
    add_runtime_args(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..eval import check_concept_texts
    from .evaluate import clip_settings
    from .generation import Variant, prepare, run_generation
    from .journal import Journal
    from .scoring import run_scoring, summarize, write_summary

    state = process_state(args.cpu, args.threads)
    concept, anti = concept_texts(args)
    if not concept:
        raise CLIError("a sweep measures the concept rate: pass --concept TEXT and --anti-concept TEXT "
                       "(or --prompt-set)")
    check_concept_texts(concept, anti)
    pipe, units, settings = prepare(args, state)
    if {u.group for u in units} != {"concept", "control"}:
        missing = "--control-prompts" if all(u.group == "concept" for u in units) else "--prompts"
        raise CLIError(f"a sweep needs concept and control prompts; also pass {missing} FILE (or --prompt-set)")
    out = Path(args.out)
    alphas = sorted(set(args.alphas))
    variants = [Variant("unsteered")] + [Variant(m, a) for m in ("plain", "dsas") for a in alphas]
    journal = Journal(out, "results", settings, state, overwrite=args.overwrite)
    records = run_generation(pipe, units, variants, out=out, journal=journal, state=state, steps=args.steps,
                             height=settings["height"], width=settings["width"], negative_prompt=args.negative_prompt,
                             steer_negative=args.steer_negative, progress=args.progress)
    del pipe

    device = device_for(state, args.cpu)
    dtype = torch_dtype(args.dtype, device)
    clip = load_clip_model(args, device=device, dtype=dtype)
    score_settings = clip_settings(args, concept, anti, dtype)
    journal = Journal(out, "scores", score_settings, state, overwrite=args.overwrite)
    scores = run_scoring(records, root=out, clip=clip, concept=concept, anti_concept=anti,
                         threshold=args.concept_threshold, journal=journal, state=state,
                         batch_size=args.clip_batch_size, progress=args.progress)
    if state.is_main_process:
        rows = summarize(scores)
        write_summary(out, rows, score_settings)
        table = write_pareto(out, rows, drift=args.drift, concept_metric=args.concept_metric,
                             settings={**settings, **score_settings, "alphas": alphas})
        echo(state, table, f"Pareto front in {out / 'pareto.json'}, {out / 'pareto.png'}, {out / 'pareto.md'}")
    return 0


def pareto_points(rows: list[dict], drift: str = "clip", concept_metric: str = "rate") -> list[dict]:
    """One point per variant: y = the concept metric on concept prompts, x = the drift on control prompts."""
    from ..eval.pareto import pareto_mask

    drift_key, concept_key = DRIFTS[drift][0], CONCEPT_METRICS[concept_metric][0]
    by_variant: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], {})[r["group"]] = r
    points = []
    for variant, groups in by_variant.items():
        c, k = groups.get("concept", {}), groups.get("control", {})
        unsteered = c.get("mode", k.get("mode")) == "unsteered"
        points.append({
            "variant": variant, "mode": c.get("mode", k.get("mode")), "alpha": 0.0 if unsteered else c.get("alpha"),
            "concept": c.get(concept_key), "control_drift": 0.0 if unsteered else k.get(drift_key),
            "clip_score_concept": c.get("clip_score"), "clip_score_control": k.get("clip_score"),
            "concept_on_control": k.get(concept_key)})
    for p, optimal in zip(points, pareto_mask(points, "control_drift", "concept")):
        p["pareto_optimal"] = optimal
    return points


def write_pareto(out: Path, rows: list[dict], *, drift: str, concept_metric: str, settings: dict) -> str:
    from ..core.io import write_text_atomic
    from ..eval.pareto import pareto_table, plot_pareto

    points = pareto_points(rows, drift, concept_metric)
    xlabel, ylabel = DRIFTS[drift][1], CONCEPT_METRICS[concept_metric][1]
    doc = {"x": {"key": "control_drift", "metric": DRIFTS[drift][0], "label": xlabel, "lower_is_better": True},
           "y": {"key": "concept", "metric": CONCEPT_METRICS[concept_metric][0], "label": ylabel,
                 "lower_is_better": True},
           "points": points, "settings": settings}
    write_text_atomic(out / "pareto.json", json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n")
    columns = [("mode", "method"), ("alpha", "alpha"), ("concept", ylabel), ("control_drift", xlabel),
               ("clip_score_concept", "CLIP score (concept)"), ("clip_score_control", "CLIP score (control)"),
               ("pareto_optimal", "Pareto")]
    table = pareto_table(points, columns)
    write_text_atomic(out / "pareto.md", "# Sweep: plain steering vs DSAS\n\nBoth objectives: lower is better.\n\n"
                      + table)
    try:
        plot_pareto(points, out / "pareto.png", x="control_drift", y="concept", xlabel=xlabel, ylabel=ylabel,
                    title="plain steering vs DSAS over alpha")
    except ImportError as e:  # the numbers are written; only the picture needs matplotlib
        warn(f"{e}; pareto.png was not drawn")
    return table
