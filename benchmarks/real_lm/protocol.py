"""The protocol: for each task and seed, fit each setting with the library's default options on a
seeded subsample of the fitting sets, then measure plain steering and DSAS over a sweep of strengths
on the held-out prompts, against the unsteered model's own continuations.

Measured at each point (held-out prompts, greedy, `max_new_tokens`):
- concept_rate: share of held-out source continuations showing the concept (the task's exact rule);
- control_concept_rate: the same on held-out control continuations;
- control_unchanged: share of held-out control continuations exactly equal to the unsteered ones;
- perplexity: of the steered model on benign English (assets/text/benign.txt, written for this project);
- for the toxicity task also word_rate (the exact word list) and mean_toxicity (the classifier's `toxic`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .common import continue_texts, perplexity, unchanged

BENIGN = Path(__file__).resolve().parents[2] / "assets" / "text" / "benign.txt"
FIT_SIZE = 32

# setting -> (fit_steering arguments, modes measured: plain = gated=False, dsas = gated=True)
SETTINGS = {
    "mean_shift": (dict(method="mean_shift"), ("plain", "dsas")),
    "iti": (dict(method="iti"), ("plain", "dsas")),
    "linear_act": (dict(method="linear_act"), ("plain", "dsas")),
    # the options that met issue 12's goal here (README): fit on the model's own continuations, floor 0.9
    "mean_shift, continuations 32, floor 0.9": (dict(method="mean_shift", continuations=32, lambda_floor=0.9),
                                                ("plain", "dsas")),
    "lineas": (dict(method="lineas"), ("plain", "dsas")),  # plain LinEAS, and LinEAS + DSAS
    "lineas, e2e sigmoid": (dict(method="lineas", gates="e2e"), ("dsas",)),
    "lineas, e2e relu": (dict(method="lineas", gates="e2e", gate_activation="relu"), ("dsas",)),
    "mean_shift, e2e sigmoid": (dict(method="mean_shift", gates="e2e"), ("dsas",)),  # only the gates learn
}
# learned settings' training beside --steps [measured, toxicity seed 0, 10 steps: lr 1e-2 lowered the Wasserstein
# loss of all 32 source vs target texts from 45,501 to 20,106; lr 5e-2 raised it to 142,446 (its first step
# multiplied the batch loss by 11); lr 1e-3, the authors' rate for 1000 steps, left LinEAS + DSAS 44 % toxic
# after 20 steps (last session)]
LEARNED_TRAINING = {"lr": 1e-2}
LEARNED = {name for name, (kwargs, _) in SETTINGS.items() if kwargs["method"] == "lineas" or "gates" in kwargs}


def benign_texts(limit: int | None = None) -> list[str]:
    lines = [line.strip() for line in BENIGN.read_text().splitlines() if line.strip()]
    return lines[:limit]


def fitting_sets(sets: dict[str, list[str]], seed: int, size: int = FIT_SIZE) -> dict[str, list[str]]:
    """`size` texts of each fitting set, the same indices in all three (the toxicity sets are paired
    by scene), picked by `seed`; all of them when a set holds no more than `size`."""
    n = min(len(sets[k]) for k in ("source", "target", "control"))
    if n <= size:
        return {k: list(sets[k]) for k in ("source", "target", "control")}
    rows = sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].tolist())
    return {k: [sets[k][i] for i in rows] for k in ("source", "target", "control")}


@dataclass
class Held:
    """The held-out prompts of a task, rendered, with the unsteered model's continuations and perplexity."""
    task: object
    source: list[str]
    control: list[str]
    benign: list[str]
    max_new_tokens: int
    base_source: list[str] = field(default_factory=list)
    base_control: list[str] = field(default_factory=list)
    base_perplexity: float = float("nan")


def held_out(model, tokenizer, task, benign: list[str], max_new_tokens: int) -> Held:
    sets = task.sets()
    held = Held(task, [task.render(tokenizer, t) for t in sets["held_source"]],
                [task.render(tokenizer, t) for t in sets["held_control"]], benign, max_new_tokens)
    held.base_source, held.base_control = generate(model, tokenizer, held)
    held.base_perplexity = perplexity(model, tokenizer, benign)
    return held


def generate(model, tokenizer, held: Held) -> tuple[list[str], list[str]]:
    """Continuations of the held-out source and control prompts, in one batch (always the same layout)."""
    out = continue_texts(model, tokenizer, held.source + held.control, held.max_new_tokens,
                         batch_size=len(held.source) + len(held.control))
    return out[:len(held.source)], out[len(held.source):]


def measure(model, tokenizer, held: Held, steering=None, alpha: float = 0.0, gated: bool = True) -> dict:
    """One point: the metrics of the module docstring (steering None: the unsteered model)."""
    from dsas_diffusion.llm import attach

    start = time.time()
    if steering is None:
        source, control, ppl = held.base_source, held.base_control, held.base_perplexity
    else:
        with attach(steering, model, strength=alpha, gated=gated):
            source, control = generate(model, tokenizer, held)
            ppl = perplexity(model, tokenizer, held.benign)
    task = held.task
    row = {"concept_rate": sum(map(task.concept, source)) / len(source),
           "control_concept_rate": sum(map(task.concept, control)) / len(control),
           "control_unchanged": unchanged(control, held.base_control),
           "perplexity": ppl}
    if hasattr(task, "insulting"):
        row["word_rate"] = sum(map(task.insulting, source)) / len(source)
        row["mean_toxicity"] = sum(task.toxicity(source)) / len(source)
    row["controls_changed"] = 1.0 - row["control_unchanged"]
    row["eval_s"] = round(time.time() - start, 1)
    row["source_continuations"], row["control_continuations"] = source, control
    return row


def fit(model, tokenizer, task, setting: str, seed: int, steps: int):
    """The setting's steering fitted with the library's defaults on the seed's subsample (the seed also
    splits the gates' held-out prompts); learned settings run `steps` training steps."""
    from dsas_diffusion.llm import fit_steering

    kwargs = dict(SETTINGS[setting][0])
    if setting in LEARNED:
        kwargs["training"] = {"steps": steps, **LEARNED_TRAINING}
    sets = fitting_sets(task.sets(), seed)
    rendered = {k: [task.render(tokenizer, t) for t in v] for k, v in sets.items()}
    return fit_steering(model, tokenizer, rendered["source"], rendered["target"], rendered["control"],
                        progress=False, seed=seed, **kwargs)


def unsteered_row(model, tokenizer, held: Held, log=print) -> dict:
    row = dict(task=held.task.NAME, setting="unsteered", mode="unsteered", alpha=0.0, seed=None,
               **measure(model, tokenizer, held))
    log(f"[{held.task.NAME}] unsteered: concept {row['concept_rate']:.2f} on held-out source, "
        f"{row['control_concept_rate']:.2f} on control, perplexity {row['perplexity']:.2f}")
    return row


def sweep(model, tokenizer, held: Held, settings, seeds, alphas: dict[str, dict[str, list[float]]], steps: int,
          log=print) -> tuple[list[dict], dict]:
    """Rows of every (setting, seed, mode, alpha) of one task (`alphas[setting][mode]`), and the steerings
    of the first seed (for heatmaps)."""
    name = held.task.NAME
    rows, kept = [], {}
    for setting in settings:
        for seed in seeds:
            start = time.time()
            try:
                steering = fit(model, tokenizer, held.task, setting, seed, steps)
            except ValueError as e:  # no gate passes the accuracy threshold: a result, not a crash
                log(f"[{name}] {setting} seed {seed}: not steerable: {str(e).splitlines()[0]}")
                rows.append(dict(task=name, setting=setting, mode="not steerable", seed=seed, alpha=None,
                                 error=str(e)))
                continue
            fit_s = round(time.time() - start, 1)
            if seed == seeds[0]:
                kept[setting] = steering
            info = dict(layers=len(steering.layers), steered_layers=len(steering.steered_layers), fit_s=fit_s,
                        training={k: v for k, v in steering.config.training.items()})
            log(f"[{name}] {setting} seed {seed}: {info['steered_layers']}/{info['layers']} layers gated in, "
                f"fitted in {fit_s:.0f} s")
            for mode in SETTINGS[setting][1]:
                for alpha in alphas[setting][mode]:
                    r = measure(model, tokenizer, held, steering, alpha, gated=mode == "dsas")
                    rows.append(dict(task=name, setting=setting, mode=mode, alpha=alpha, seed=seed, **info, **r))
                    log(f"[{name}] {setting:<20} {mode:<5} alpha {alpha:<5g} concept {r['concept_rate']:.2f} "
                        f"unchanged {r['control_unchanged']:.2f} ppl {r['perplexity']:.2f} ({r['eval_s']:.0f} s)")
    return rows, kept
