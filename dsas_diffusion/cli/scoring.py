"""Scoring the images of a run, shared by `dsas eval` and `dsas sweep`.

Per image (scores.jsonl, resumable like results.jsonl): the CLIP score against its prompt, the
zero-shot probability of the concept and whether it shows it, and the drift from its unsteered
twin (the unit's `unsteered` image: same prompt, seed and settings). A score is reused on a
later run only if it was computed on the same image bytes (`image_sha256` of the record), so
images drawn again are scored again. Per variant and prompt group (summary.json, summary.md):
the means, and the concept rate.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..core.io import write_text_atomic
from .common import CLIError
from .journal import Journal

SUMMARY_COLUMNS = [("variant", "variant"), ("group", "prompts"), ("n", "images"), ("clip_score", "CLIP score"),
                   ("concept_rate", "concept rate"), ("concept_prob", "P(concept)"), ("drift_clip", "drift (CLIP)"),
                   ("drift_pixel", "drift (pixels)")]


def run_scoring(records: list[dict], *, root: Path, clip, concept: list[str], anti_concept: list[str],
                threshold: float, journal: Journal, state, batch_size: int = 32, progress: bool = True) -> list[dict]:
    """Score what is not scored yet, this process's share of it; returns the scores of `records`, merged."""
    from tqdm.auto import tqdm

    done = journal.open()
    sha = {r["key"]: r.get("image_sha256") for r in records}

    def scored(key: str) -> bool:  # a score counts only for the very image it was computed on
        return key in done and done[key].get("image_sha256") == sha[key]

    units: dict[str, list[dict]] = {}
    for rec in records:
        units.setdefault(rec["unit"], []).append(rec)
    todo = [recs for recs in units.values() if not all(scored(r["key"]) for r in recs)]
    with state.split_between_processes(todo) as mine:
        concept_emb = clip.text_embeddings(concept) if concept else None
        anti_emb = clip.text_embeddings(anti_concept) if anti_concept else None
        desc = "scoring" if state.num_processes == 1 else f"scoring [{state.process_index}]"
        with tqdm(total=sum(len(u) for u in mine), desc=desc, unit="img", disable=not progress,
                  position=state.process_index) as bar:
            for chunk in _chunks(mine, batch_size):
                for score in _score_units(chunk, root, clip, concept_emb, anti_emb, threshold):
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


def _score_units(units: list[list[dict]], root: Path, clip, concept_emb, anti_emb, threshold: float) -> list[dict]:
    from ..eval import clip_scores, concept_probabilities, embedding_drift, pixel_drift

    recs = [r for unit in units for r in unit]
    images = [_open_image(root, r) for r in recs]
    emb = clip.image_embeddings(images)
    cs = clip_scores(emb, clip.text_embeddings([r["prompt"] for r in recs]))
    cp = concept_probabilities(emb, concept_emb, anti_emb, clip.logit_scale) if concept_emb is not None else None
    index = {r["key"]: i for i, r in enumerate(recs)}
    twins = {r["unit"]: r for r in recs if r.get("mode") == "unsteered"}
    scores = []
    for i, r in enumerate(recs):
        twin = twins.get(r["unit"])
        s = {k: r.get(k) for k in ("key", "unit", "variant", "mode", "alpha", "group", "prompt", "seed", "image_sha256")}
        s["clip_score"] = round(float(cs[i]), 4)
        s["concept_prob"] = None if cp is None else round(float(cp[i]), 4)
        s["is_concept"] = None if cp is None else bool(cp[i] > threshold)
        s["drift_clip"] = s["drift_pixel"] = None
        if twin is not None and twin is not r:
            j = index[twin["key"]]
            s["drift_clip"] = round(float(embedding_drift(emb[i:i + 1], emb[j:j + 1])[0]), 6)
            s["drift_pixel"] = round(pixel_drift(images[i], images[j]), 6)
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


def summarize(scores: list[dict]) -> list[dict]:
    """Means per (variant, prompt group), in the order the variants first appear."""
    from ..eval import concept_rate

    groups: dict[tuple, list[dict]] = {}
    for s in scores:
        groups.setdefault((s.get("variant"), s.get("group")), []).append(s)
    rows = []
    for (variant, group), items in groups.items():
        shows = [bool(s["is_concept"]) for s in items if s.get("is_concept") is not None]
        row = {"variant": variant, "mode": items[0].get("mode"), "alpha": items[0].get("alpha"), "group": group,
               "n": len(items), "clip_score": _mean(s["clip_score"] for s in items),
               "concept_rate": round(concept_rate(shows), 6) if shows else None,
               "concept_prob": _mean(s.get("concept_prob") for s in items),
               "drift_clip": _mean(s.get("drift_clip") for s in items),
               "drift_pixel": _mean(s.get("drift_pixel") for s in items)}
        rows.append(row)
    return rows


def write_summary(folder: Path, rows: list[dict], settings: dict) -> str:
    """summary.json and summary.md, atomically; returns the markdown table."""
    from ..eval.pareto import pareto_table

    doc = {"settings": settings, "rows": rows}
    write_text_atomic(folder / "summary.json", json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n")
    table = pareto_table(rows, SUMMARY_COLUMNS)
    write_text_atomic(folder / "summary.md", "# Evaluation summary\n\n" + table)
    return table


def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return round(sum(vals) / len(vals), 6) if vals else None
