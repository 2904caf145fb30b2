"""The sweep's rows as benchmarks/results/real_lm.{json,md,png} and token heatmaps of real continuations."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dsas_diffusion.core.io import atomic_path
from dsas_diffusion.eval.pareto import pareto_mask, pareto_table

GOAL_CONCEPT, GOAL_UNCHANGED = 0.10, 0.75  # issue 12: concept <= 10 % with >= 75 % of controls unchanged
METRICS = ("concept_rate", "control_unchanged", "perplexity", "control_concept_rate", "word_rate", "mean_toxicity")


def averaged(rows: list[dict]) -> list[dict]:
    """One point per (task, setting, mode, alpha): each metric's mean over seeds, and the seeds' range
    of the concept rate and of control_unchanged."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["mode"] != "not steerable":
            groups.setdefault((r["task"], r["setting"], r["mode"], r["alpha"]), []).append(r)
    points = []
    for (task, setting, mode, alpha), rs in groups.items():
        p = dict(task=task, setting=setting, mode=mode, alpha=alpha, seeds=len(rs),
                 group=setting if mode == "unsteered" else f"{setting}, {mode}")
        for m in METRICS:
            values = [r[m] for r in rs if m in r]
            if values:
                p[m] = sum(values) / len(values)
        for m in ("concept_rate", "control_unchanged"):
            p[f"{m}_range"] = f"{min(r[m] for r in rs):.2f}-{max(r[m] for r in rs):.2f}"
        p["controls_changed"] = 1.0 - p["control_unchanged"]
        points.append(p)
    return points


def best_table(points: list[dict]) -> str:
    """Per task and (setting, mode): the most controls unchanged at concept rate <= 10 %, else the lowest
    concept rate reached."""
    lines = ["| task | setting | mode | alpha | concept rate | controls unchanged | perplexity | meets goal |",
             "|---|---|---|---|---|---|---|---|"]
    for task in dict.fromkeys(p["task"] for p in points):
        for group in dict.fromkeys(p["group"] for p in points if p["task"] == task):
            ps = [p for p in points if p["task"] == task and p["group"] == group]
            ok = [p for p in ps if p["concept_rate"] <= GOAL_CONCEPT]
            p = max(ok, key=lambda p: (p["control_unchanged"], -p["perplexity"])) if ok else \
                min(ps, key=lambda p: (p["concept_rate"], -p["control_unchanged"]))
            meets = p["concept_rate"] <= GOAL_CONCEPT and p["control_unchanged"] >= GOAL_UNCHANGED
            lines.append(f"| {task} | {p['setting']} | {p['mode']} | {p['alpha']:g} | {p['concept_rate']:.2f} | "
                         f"{p['control_unchanged']:.2f} | {p['perplexity']:.2f} | {'yes' if meets else ''} |")
    return "\n".join(lines) + "\n"


def write(rows: list[dict], meta: dict, results: Path, stem: str = "real_lm") -> list[Path]:
    points = averaged(rows)
    results.mkdir(parents=True, exist_ok=True)
    paths = [results / f"{stem}.json", results / f"{stem}.md", results / f"{stem}.png"]
    with atomic_path(paths[0]) as tmp:
        Path(tmp).write_text(json.dumps({"meta": meta, "points": points, "rows": rows}, indent=1))
    columns = [("setting", "setting"), ("mode", "mode"), ("alpha", "alpha"), ("seeds", "seeds"),
               ("concept_rate", "concept rate"), ("concept_rate_range", "over seeds"),
               ("control_unchanged", "controls unchanged"), ("control_unchanged_range", "over seeds"),
               ("perplexity", "perplexity"), ("control_concept_rate", "concept on controls"),
               ("word_rate", "word list"), ("mean_toxicity", "mean toxic"), ("pareto", "Pareto")]
    text = [f"# Real-model benchmark ({meta['model']})\n", f"`{meta['command']}`: {meta['wall_s']:.0f} s wall, "
            f"{meta['threads']} thread(s). Held-out prompts, greedy, {meta['max_new_tokens']} new tokens; "
            f"means over seeds {meta['seeds']} (learned settings: seeds {meta['learned_seeds']}).\n",
            "## Best point per setting (most controls unchanged at concept rate <= 10 %)\n", best_table(points)]
    for task in dict.fromkeys(p["task"] for p in points):
        ps = [p for p in points if p["task"] == task]
        for p, m in zip(ps, pareto_mask(ps, "concept_rate", "controls_changed")):
            p["pareto"] = m
        text += [f"\n## {task}\n", pareto_table(ps, columns)]
    with atomic_path(paths[1]) as tmp:
        Path(tmp).write_text("\n".join(text))
    plot(points, paths[2])
    return paths


def plot(points: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(p["task"] for p in points))
    fig = Figure(figsize=(12, 4.6 * len(tasks)), dpi=90)
    axes = fig.subplots(len(tasks), 2, squeeze=False)
    for row, task in enumerate(tasks):
        ps = [p for p in points if p["task"] == task]
        for col, (y, label) in enumerate((("controls_changed", "held-out controls changed (share)"),
                                          ("perplexity", "perplexity on benign text"))):
            ax = axes[row][col]
            front = [p for p, m in zip(ps, pareto_mask(ps, "concept_rate", y)) if m]
            settings = dict.fromkeys(p["setting"] for p in ps if p["mode"] != "unsteered")
            colours = {s: f"C{i}" for i, s in enumerate(settings)}
            for group in dict.fromkeys(p["group"] for p in ps):
                g = sorted((p for p in ps if p["group"] == group), key=lambda p: p["alpha"])
                style = dict(marker="*", s=200, color="black", zorder=3) if group == "unsteered" else {}
                if style:
                    ax.scatter([p["concept_rate"] for p in g], [p[y] for p in g], label=group, **style)
                    continue
                dsas = g[0]["mode"] == "dsas"
                ax.plot([p["concept_rate"] for p in g], [p[y] for p in g], marker="o" if dsas else "x",
                        linestyle="-" if dsas else ":", color=colours[g[0]["setting"]], label=group)
                for p in g:
                    ax.annotate(f"{p['alpha']:g}", (p["concept_rate"], p[y]), textcoords="offset points",
                                xytext=(3, 3), fontsize=7)
            ax.scatter([p["concept_rate"] for p in front], [p[y] for p in front], s=150, facecolors="none",
                       edgecolors="black", label="Pareto front")
            ax.axvline(GOAL_CONCEPT, color="grey", linewidth=0.8, linestyle="--")
            if y == "controls_changed":
                ax.axhline(1 - GOAL_UNCHANGED, color="grey", linewidth=0.8, linestyle="--")
            else:
                ax.set_yscale("log")
            ax.set_xlabel(f"{task}: concept rate on held-out source prompts")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            if col == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


@torch.no_grad()
def heatmaps(model, tokenizer, steering, alpha: float, prompts: dict[str, str], folder: Path,
             max_new_tokens: int) -> list[Path]:
    """One PNG per prompt: the lambdas of every steered layer over the prompt and its steered continuation."""
    from dsas_diffusion.llm import attach
    from dsas_diffusion.llm.plots import token_heatmap_png

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for label, prompt in prompts.items():
        enc = tokenizer(prompt, return_tensors="pt")  # as fitting tokenizes: with a BOS where the model has one
        with attach(steering, model, strength=alpha) as handle:
            seq = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            scales = {name.replace("model.layers.", "layer "): s for name, s in handle.scales.items()}
        tokens = tokenizer.convert_ids_to_tokens(seq[0].tolist())[:-1]
        continuation = tokenizer.decode(seq[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        title = f"{label}, alpha {alpha:g}: ...{prompt[-40:]!r} -> {continuation[:60]!r}"
        paths.append(token_heatmap_png(tokens, scales, folder / f"{label}.png", row=0, title=title))
    return paths

