"""`dsas sweep`: plain steering and DSAS over a grid of strengths alpha, on concept and control
prompts, scored like `dsas eval`; the result is a Pareto front of concept rate (concept prompts,
lower is better) against drift (control prompts, lower is better): pareto.json, pareto.png, pareto.md.

Everything that can refuse the run does so before the first image: the prompts, the concept judge,
the scorers (loaded first, so a missing package or CLIP model costs seconds, not a whole sweep).
"""

from __future__ import annotations

import json
from pathlib import Path

from . import arguments as types
from .common import (CLIError, add_clip_args, add_generation_args, add_output_args, add_prompt_args,
                     add_runtime_args, concept_texts, device_for, echo, process_state, torch_dtype, warn)
from .scoring import add_scorer_args

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
    add_scorer_args(p)
    add_clip_args(p)
    p.add_argument("--drift", choices=sorted(DRIFTS),
                   help="drift measure of the front (default: clip with the clip scorer, else pixel)")
    p.add_argument("--concept-metric", choices=sorted(CONCEPT_METRICS), default="rate",
                   help="rate: fraction of images showing the concept; prob: mean P(concept) (default: rate)")
    add_output_args(p)
    add_runtime_args(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    from .common import prompt_groups
    from .generation import Variant, prepare, run_generation
    from .journal import Journal
    from .scoring import (check_prompts, choose_judge, load_scorers, run_scoring, scoring_settings, summarize,
                          summary_columns, write_summary)

    state = process_state(args.cpu, args.threads)
    concept, anti = concept_texts(args)
    judge = choose_judge(args, concept, anti)
    if judge is None:
        raise CLIError("a sweep measures the concept rate: pass --concept TEXT and --anti-concept TEXT (or "
                       "--prompt-set) for the clip scorer, or --scorers nudenet, or --scorers toy --toy-concept WORD")
    drift = args.drift or ("clip" if "clip" in args.scorers else "pixel")
    if drift == "clip" and "clip" not in args.scorers:
        raise CLIError(f"--drift clip needs the clip scorer; add clip to --scorers (now {','.join(args.scorers)}) "
                       "or pass --drift pixel")
    groups = prompt_groups(args)
    if set(groups) != {"concept", "control"}:
        missing = "--control-prompts" if "concept" in groups else "--prompts"
        raise CLIError(f"a sweep needs concept and control prompts; also pass {missing} FILE (or --prompt-set)")
    device = device_for(state, args.cpu)
    scorers = load_scorers(args, concept=concept, anti=anti, device=device, dtype=torch_dtype(args.dtype, device))
    check_prompts(scorers, [row.text for rows in groups.values() for row in rows])
    score_settings = scoring_settings(scorers, judge)

    pipe, units, settings = prepare(args, state)
    out = Path(args.out)
    alphas = sorted(set(args.alphas))
    variants = [Variant("unsteered")] + [Variant(m, a) for m in ("plain", "dsas") for a in alphas]
    journal = Journal(out, "results", settings, state, overwrite=args.overwrite)
    records = run_generation(pipe, units, variants, out=out, journal=journal, state=state, steps=args.steps,
                             height=settings["height"], width=settings["width"], negative_prompt=args.negative_prompt,
                             steer_negative=args.steer_negative, progress=args.progress)
    del pipe

    journal = Journal(out, "scores", score_settings, state, overwrite=args.overwrite)
    scores = run_scoring(records, root=out, scorers=scorers, judge=judge, journal=journal, state=state,
                         batch_size=args.clip_batch_size, progress=args.progress)
    if state.is_main_process:
        columns = summary_columns(scorers, judge)
        rows = summarize(scores, columns)
        write_summary(out, rows, score_settings, columns)
        extras = [(k, h) for scorer in scorers for k, _, _, h in scorer.columns if k != DRIFTS[drift][0]]
        table = write_pareto(out, rows, drift=drift, concept_metric=args.concept_metric, judge=judge, extras=extras,
                             settings={**settings, **score_settings, "alphas": alphas, "drift": drift})
        echo(state, table, f"Pareto front in {out / 'pareto.json'}, {out / 'pareto.png'}, {out / 'pareto.md'}")
    return 0


CLIP_SCORE = (("clip_score", "CLIP score"),)


def pareto_points(rows: list[dict], drift: str = "clip", concept_metric: str = "rate",
                  extras=CLIP_SCORE) -> list[dict]:
    """One point per variant: y = the concept metric on concept prompts, x = the drift on control prompts;
    plus, for each (key, header) of `extras`, its value on both prompt groups (KEY_concept, KEY_control)."""
    from ..eval.pareto import pareto_mask

    drift_key, concept_key = DRIFTS[drift][0], CONCEPT_METRICS[concept_metric][0]
    by_variant: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], {})[r["group"]] = r
    points = []
    for variant, groups in by_variant.items():
        c, k = groups.get("concept", {}), groups.get("control", {})
        unsteered = c.get("mode", k.get("mode")) == "unsteered"
        point = {"variant": variant, "mode": c.get("mode", k.get("mode")),
                 "alpha": 0.0 if unsteered else c.get("alpha"), "concept": c.get(concept_key),
                 "control_drift": 0.0 if unsteered else k.get(drift_key), "concept_on_control": k.get(concept_key)}
        for key, _ in extras:
            point[f"{key}_concept"], point[f"{key}_control"] = c.get(key), k.get(key)
        points.append(point)
    for p, optimal in zip(points, pareto_mask(points, "control_drift", "concept")):
        p["pareto_optimal"] = optimal
    return points


def write_pareto(out: Path, rows: list[dict], *, drift: str, concept_metric: str, settings: dict,
                 judge: str | None = None, extras=CLIP_SCORE) -> str:
    from ..core.io import write_text_atomic
    from ..eval.pareto import pareto_table, plot_pareto

    points = pareto_points(rows, drift, concept_metric, extras)
    xlabel, ylabel = DRIFTS[drift][1], CONCEPT_METRICS[concept_metric][1]
    if judge:
        ylabel += f" ({judge})"
    doc = {"x": {"key": "control_drift", "metric": DRIFTS[drift][0], "label": xlabel, "lower_is_better": True},
           "y": {"key": "concept", "metric": CONCEPT_METRICS[concept_metric][0], "label": ylabel,
                 "lower_is_better": True, "judge": judge},
           "points": points, "settings": settings}
    write_text_atomic(out / "pareto.json", json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n")
    columns = [("mode", "method"), ("alpha", "alpha"), ("concept", ylabel), ("control_drift", xlabel)]
    columns += [(f"{key}_{group}", f"{header} ({group})") for key, header in extras for group in ("concept", "control")]
    table = pareto_table(points, columns + [("pareto_optimal", "Pareto")])
    write_text_atomic(out / "pareto.md", "# Sweep: plain steering vs DSAS\n\nBoth objectives: lower is better.\n\n"
                      + table)
    try:
        plot_pareto(points, out / "pareto.png", x="control_drift", y="concept", xlabel=xlabel, ylabel=ylabel,
                    title="plain steering vs DSAS over alpha")
    except ImportError as e:  # the numbers are written; only the picture needs matplotlib
        warn(f"{e}; pareto.png was not drawn")
    return table
