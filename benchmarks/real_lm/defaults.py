"""How `fit_steering`'s language-model defaults were chosen: DSAS against plain steering on a real
pretrained model (SmolLM2-135M-Instruct), on the topic task (`topic.py`: stop talking about cats).

    python -m benchmarks.real_lm.defaults           # the sweep (tens of minutes on 2 CPU cores)
    python -m benchmarks.real_lm.defaults --quick   # one candidate, two strengths

Each candidate is a set of fitting and run-time options; alpha is raised along ALPHAS until the concept
rate of the held-out source prompts is at most 10 % (then the sweep of that candidate stops). At every
alpha: the concept rate of held-out source continuations (topic.concept) and the share of held-out control
continuations exactly unchanged (the same string as unsteered, same batches). Plain steering
(`gated=False`) uses the same maps. Writes benchmarks/results/real_lm_defaults.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dsas_diffusion.llm import attach, fit_steering

from . import common, topic

RESULTS = Path(__file__).resolve().parents[1] / "results"
ALPHAS = (0.5, 1.0, 2.0, 4.0, 8.0)
TARGET_RATE = 0.10
# (name, method, fitting options, run-time options, gated); fits with the same (method, options) are shared
CANDIDATES = [
    ("DSAS pca_rank=16, floor 0.9", "mean_shift", {"pca_rank": 16}, {"lambda_floor": 0.9}, True),
    ("plain mean shift", "mean_shift", {"pca_rank": 16}, {}, False),
    ("DSAS pca_rank=16, continuations=32, floor 0.9", "mean_shift", {"pca_rank": 16, "continuations": 32},
     {"lambda_floor": 0.9}, True),
    ("DSAS Linear-AcT pca_rank=16, floor 0.9", "linear_act", {"pca_rank": 16}, {"lambda_floor": 0.9}, True),
    ("plain Linear-AcT", "linear_act", {"pca_rank": 16}, {}, False),
    ("DSAS pca_rank=16, floor 0", "mean_shift", {"pca_rank": 16}, {"lambda_floor": 0.0}, True),
    ("DSAS pca_rank=5 (former default), floor 0", "mean_shift", {"pca_rank": 5}, {"lambda_floor": 0.0}, True),
]
QUICK = CANDIDATES[:2]


def measure(model, tokenizer, rendered: dict, unsteered: dict, steering=None, alpha: float = 0.0, gated=True,
            **run) -> dict:
    def continuations(texts):
        if steering is None:
            return common.continue_texts(model, tokenizer, texts)
        with attach(steering, model, strength=alpha, gated=gated, record_scales=False, **run):
            return common.continue_texts(model, tokenizer, texts)

    source = continuations(rendered["held_source"])
    control = continuations(rendered["held_control"])
    return {"alpha": alpha, "concept_rate": sum(map(topic.concept, source)) / len(source),
            "control_unchanged": common.unchanged(control, unsteered["held_control"]) if unsteered else 1.0,
            "source_examples": source[:3], "control_examples": control[:3]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one candidate against plain steering, alphas 1 and 2")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    common.ensure_wheels()
    start = time.time()
    model, tokenizer = common.load_model()
    sets = topic.sets()
    rendered = {label: [topic.render(tokenizer, t) for t in texts] for label, texts in sets.items()}
    base = measure(model, tokenizer, rendered, None)
    unsteered = {"held_control": common.continue_texts(model, tokenizer, rendered["held_control"])}
    print(f"[defaults] unsteered: concept rate {base['concept_rate']:.3f} on held-out source prompts "
          f"({time.time() - start:.0f} s)", flush=True)
    fits, rows = {}, []
    for name, method, options, run, gated in (QUICK if args.quick else CANDIDATES):
        key = (method, tuple(sorted(options.items())))
        if key not in fits:
            t = time.time()
            fits[key] = fit_steering(model, tokenizer, rendered["source"], rendered["target"], rendered["control"],
                                     method=method, progress=False, **options)
            print(f"[defaults] fitted {method} {options} in {time.time() - t:.0f} s: "
                  f"{len(fits[key].steered_layers)} of {len(fits[key].layers)} layers steered", flush=True)
        steering = fits[key]
        for alpha in ((1.0, 2.0) if args.quick else ALPHAS):
            point = measure(model, tokenizer, rendered, unsteered, steering, alpha, gated, **run)
            point.update(name=name, method=method, options=options, run=run, gated=gated,
                         steered_layers=len(steering.steered_layers) if gated else len(steering.layers))
            rows.append(point)
            print(f"[defaults] {name} alpha {alpha:g}: concept {point['concept_rate']:.3f}, controls unchanged "
                  f"{point['control_unchanged']:.3f} ({time.time() - start:.0f} s)", flush=True)
            write(base, rows, time.time() - start, args.quick)  # as it goes: a long sweep can be read midway
            if point["concept_rate"] <= TARGET_RATE:
                break


def write(base: dict, rows: list[dict], seconds: float, quick: bool) -> None:
    RESULTS.mkdir(exist_ok=True)
    stem = "real_lm_defaults_quick" if quick else "real_lm_defaults"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"unsteered": base, "points": rows, "seconds": seconds},
                                                      indent=1))
    lines = ["# Fitting defaults on SmolLM2-135M-Instruct, topic task (cats), held-out prompts",
             "", f"Unsteered: concept rate {base['concept_rate']:.3f} on 16 held-out source prompts; 16 held-out "
             f"controls. Greedy, 32 new tokens. Sweep stops at concept rate <= {TARGET_RATE:.0%}. "
             f"Wall time {seconds / 60:.0f} min.", "",
             "| setting | layers steered | alpha | concept rate (source) | controls unchanged |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['steered_layers']} | {r['alpha']:g} | {r['concept_rate']:.3f} | "
                     f"{r['control_unchanged']:.3f} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
