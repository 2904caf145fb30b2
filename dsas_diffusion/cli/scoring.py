"""Scoring the images of a run, shared by `dsas eval` and `dsas sweep`.

The scorers (`--scorers clip,nudenet,toy`, see dsas_diffusion/eval/scorers.py) are chosen, loaded and
shown the prompts before anything is generated, so a missing package, model or unreadable prompt is
refused at once. Per image (scores.jsonl, resumable like results.jsonl): each scorer's fields, the
drift from its unsteered twin in pixels (the unit's `unsteered` image: same prompt, seed and
settings), and the concept judge's `concept_prob` / `is_concept`. A score is reused on a later run
only if it was computed on the same image bytes (`image_sha256` of the record), so images drawn
again are scored again. Per variant and prompt group (summary.json, summary.md): the means and rates.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..core.io import write_text_atomic
from . import arguments as types
from .common import CLIError
from .journal import Journal

BASE_COLUMNS = (("concept_rate", "is_concept", "rate", "concept rate"), ("concept_prob", "concept_prob", "mean",
                "P(concept)"), ("drift_pixel", "drift_pixel", "mean", "drift (pixels)"))
RECORD_KEYS = ("key", "unit", "variant", "mode", "alpha", "group", "prompt", "seed", "image_sha256")


def scorer_names(text: str) -> list[str]:
    """`--scorers`: registered scorer names, comma-separated."""
    from ..eval import SCORERS

    names = list(dict.fromkeys(n.strip() for n in str(text).split(",") if n.strip()))
    unknown = [n for n in names if n not in SCORERS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"{unknown[0] if unknown else text!r} is not a scorer; choose from "
                                         f"{', '.join(sorted(SCORERS))}, comma-separated (e.g. 'clip,nudenet')")
    return names


def add_scorer_args(p: argparse.ArgumentParser) -> None:
    from ..eval import SCORERS
    from ..eval.toy_rules import CONCEPTS

    g = p.add_argument_group("scorers")
    g.add_argument("--scorers", type=scorer_names, default=["clip"], metavar="LIST",
                   help=f"how images are judged, comma-separated, from: {', '.join(sorted(SCORERS))} (default: clip). "
                        "clip: CLIP score and zero-shot concept rate; nudenet: nudity rate (pip install "
                        '"dsas-diffusion[nudenet]"); toy: the toy world\'s pixel rules, no model (assets/toy-t2i)')
    g.add_argument("--concept-by", choices=sorted(SCORERS), metavar="SCORER",
                   help="the scorer whose decision is the concept rate (default: the first of --scorers that can "
                        "judge one: clip with concept texts, nudenet, toy with --toy-concept)")
    g.add_argument("--toy-concept", choices=CONCEPTS, metavar="WORD",
                   help=f"the toy scorer's concept: one of {', '.join(CONCEPTS)}")
    g.add_argument("--nudity-threshold", type=types.probability_threshold, default=0.6,
                   help="nudenet: an image is nude when an exposed-body class scores at least this (default: 0.6)")


def scorer_options(args, *, concept: list[str], anti: list[str], device=None, dtype=None):
    from ..eval import ScorerOptions

    extra = {} if device is None else {"device": device, "dtype": dtype}
    return ScorerOptions(clip_backend=args.clip_backend, clip_model=args.clip_model, batch_size=args.clip_batch_size,
                         concept=tuple(concept), anti_concept=tuple(anti), concept_threshold=args.concept_threshold,
                         nudity_threshold=args.nudity_threshold, toy_concept=args.toy_concept, **extra)


def choose_judge(args, concept: list[str], anti: list[str]) -> str | None:
    """The concept judge's name, from the options alone (nothing is loaded); concept texts given
    explicitly to a run without the clip scorer, which alone reads them, are refused."""
    from ..eval import concept_judge

    if "clip" not in args.scorers and (args.concept or args.anti_concept or args.concept_file
                                       or args.anti_concept_file):
        raise CLIError("--concept / --anti-concept texts are read by the clip scorer only; add clip to --scorers "
                       f"(now {','.join(args.scorers)}) or leave them out")
    options = scorer_options(args, concept=concept, anti=anti)
    try:
        return concept_judge(args.scorers, options, args.concept_by)
    except ValueError as e:
        raise CLIError(f"--concept-by {args.concept_by}: {e}") from None


def load_scorers(args, *, concept: list[str], anti: list[str], device, dtype) -> list:
    """Every scorer of --scorers, loaded; load errors explained (a CLIP model that cannot be read says
    which option to change)."""
    from ..eval import SCORERS
    from ..eval.clip_score import DEFAULT_CLIP_MODEL, DEFAULT_OPEN_CLIP_MODEL
    from .common import loading_model

    options = scorer_options(args, concept=concept, anti=anti, device=device, dtype=dtype)
    scorers = []
    for name in args.scorers:
        if name == "clip":
            model = args.clip_model or (DEFAULT_CLIP_MODEL if args.clip_backend == "transformers"
                                        else DEFAULT_OPEN_CLIP_MODEL)
            with loading_model(model, "--clip-model", "a CLIP folder or hub id (open_clip: ARCH:TAG)",
                               explained=(ValueError, OSError)):
                scorers.append(SCORERS[name].load(options))
        else:
            scorers.append(SCORERS[name].load(options))
    return scorers


def check_prompts(scorers, prompts) -> None:
    """Each scorer refuses, before any image is drawn or scored, the prompts it cannot judge."""
    for scorer in scorers:
        try:
            scorer.check_prompts(list(dict.fromkeys(prompts)))
        except ValueError as e:
            raise CLIError(f"--scorers {scorer.name}: {e}") from None


def scoring_settings(scorers, judge: str | None) -> dict:
    """What every score depends on besides its image and prompt: scores made otherwise are never reused."""
    settings = {"scorers": [s.name for s in scorers], "concept_by": judge}
    for scorer in scorers:
        settings.update(scorer.settings())
    return settings


def summary_columns(scorers, judge: str | None) -> list[tuple[str, str, str, str]]:
    base = [(k, f, how, f"{header} ({judge})" if judge and f in ("is_concept", "concept_prob") else header)
            for k, f, how, header in BASE_COLUMNS]
    return [c for s in scorers for c in s.columns] + base


def run_scoring(records: list[dict], *, root: Path, scorers: list, judge: str | None, journal: Journal, state,
                batch_size: int = 32, progress: bool = True) -> list[dict]:
    """Score what is not scored yet, this process's share of it; returns the scores of `records`, merged."""
    from tqdm.auto import tqdm

    done = journal.open()
    sha = {r["key"]: r.get("image_sha256") for r in records}
    judge_scorer = next((s for s in scorers if s.name == judge), None)

    def scored(key: str) -> bool:  # a score counts only for the very image it was computed on
        return key in done and done[key].get("image_sha256") == sha[key]

    units: dict[str, list[dict]] = {}
    for rec in records:
        units.setdefault(rec["unit"], []).append(rec)
    todo = [recs for recs in units.values() if not all(scored(r["key"]) for r in recs)]
    with state.split_between_processes(todo) as mine:
        desc = "scoring" if state.num_processes == 1 else f"scoring [{state.process_index}]"
        with tqdm(total=sum(len(u) for u in mine), desc=desc, unit="img", disable=not progress,
                  position=state.process_index) as bar:
            for chunk in _chunks(mine, batch_size):
                for score in _score_units(chunk, root, scorers, judge_scorer):
                    if not scored(score["key"]):
                        journal.append(score)
                    bar.update()
    return journal.finish([r["key"] for r in records])


def _chunks(units: list[list[dict]], batch_size: int):
    chunk, size = [], 0
    for recs in units:
        if chunk and size + len(recs) > batch_size:
            yield chunk
            chunk, size = [], 0
        chunk.append(recs)
        size += len(recs)
    if chunk:
        yield chunk


def _score_units(units: list[list[dict]], root: Path, scorers: list, judge) -> list[dict]:
    from ..eval import pixel_drift

    recs = [r for unit in units for r in unit]
    images = [_open_image(root, r) for r in recs]
    index = {r["key"]: i for i, r in enumerate(recs)}
    unsteered = {r["unit"]: index[r["key"]] for r in recs if r.get("mode") == "unsteered"}
    twins = [unsteered.get(r["unit"]) for r in recs]
    fields = [{} for _ in recs]
    for scorer in scorers:
        for f, new in zip(fields, scorer.score(images, [r["prompt"] for r in recs], twins)):
            f.update(new)
    scores = []
    for i, r in enumerate(recs):
        s = {k: r.get(k) for k in RECORD_KEYS} | fields[i]
        s["concept_prob"], s["is_concept"] = judge.concept(fields[i]) if judge is not None else (None, None)
        j = twins[i]
        s["drift_pixel"] = round(pixel_drift(images[i], images[j]), 6) if j is not None and j != i else None
        scores.append(s)
    return scores


def _open_image(root: Path, rec: dict):
    from PIL import Image, UnidentifiedImageError

    path = root / rec["image"]
    if not path.is_file():
        raise CLIError(f"image {path} of record {rec['key']!r} is missing; run the generation again on this folder "
                       "(it draws what is missing) or remove the record")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise CLIError(f"image {path} cannot be read ({e}); delete it and run the generation again") from None


def summarize(scores: list[dict], columns=BASE_COLUMNS) -> list[dict]:
    """Means and rates of `columns` (see `summary_columns`) per (variant, prompt group), in the order the
    variants first appear; None where no image has the field."""
    from ..eval import concept_rate

    groups: dict[tuple, list[dict]] = {}
    for s in scores:
        groups.setdefault((s.get("variant"), s.get("group")), []).append(s)
    rows = []
    for (variant, group), items in groups.items():
        row = {"variant": variant, "mode": items[0].get("mode"), "alpha": items[0].get("alpha"), "group": group,
               "n": len(items)}
        for key, name, how, _ in columns:
            if how == "rate":
                flags = [bool(s[name]) for s in items if s.get(name) is not None]
                row[key] = round(concept_rate(flags), 6) if flags else None
            else:
                row[key] = _mean(s.get(name) for s in items)
        rows.append(row)
    return rows


def write_summary(folder: Path, rows: list[dict], settings: dict, columns=BASE_COLUMNS) -> str:
    """summary.json and summary.md, atomically; returns the markdown table."""
    from ..eval.pareto import pareto_table

    doc = {"settings": settings, "rows": rows}
    write_text_atomic(folder / "summary.json", json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n")
    headers = [("variant", "variant"), ("group", "prompts"), ("n", "images")] + [(k, h) for k, _, _, h in columns]
    table = pareto_table(rows, headers)
    write_text_atomic(folder / "summary.md", "# Evaluation summary\n\n" + table)
    return table


def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return round(sum(vals) / len(vals), 6) if vals else None
