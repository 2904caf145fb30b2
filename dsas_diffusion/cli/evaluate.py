"""`dsas eval`: judge the images of a run with the chosen scorers (CLIP score, concept rate and drift
by default; NudeNet's nudity rate; the toy world's pixel rules), each loaded before any image is read.

RUN is a folder written by `dsas generate` or `dsas sweep` (its results.jsonl), or any JSONL
file of {"image": path, "prompt": text} records (paths relative to the file; optional "group",
and "unit" + "mode": "unsteered" to mark the twins drift is measured from).
"""

from __future__ import annotations

import json
from pathlib import Path

from . import arguments as types
from .common import (CLIError, add_clip_args, add_runtime_args, concept_texts, device_for, echo, process_state,
                     torch_dtype)
from .scoring import add_scorer_args


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="score generated images: CLIP score, concept or nudity rate, drift",
        description="Score the images of a run with --scorers (default clip: CLIP score against their prompts, "
                    "concept rate by CLIP zero-shot, concept vs anti-concept texts), and their drift from their "
                    "unsteered twins. Writes scores.jsonl (resumable), summary.json and summary.md.")
    p.add_argument("run_path", metavar="RUN", help="folder written by dsas generate / sweep, or a JSONL file of "
                                              '{"image": ..., "prompt": ...} records')
    add_scorer_args(p)
    add_clip_args(p)
    p.add_argument("--prompt-set", metavar="DIR", help="take the concept texts from DIR/concept.txt and "
                                                         "DIR/anti_concept.txt")
    p.add_argument("--out", type=types.output_folder, help="where to write the scores (default: the RUN folder)")
    p.add_argument("--overwrite", action="store_true", help="discard earlier scores and score again")
    add_runtime_args(p, dtype_default="float32")
    p.set_defaults(handler=run)


def run(args) -> int:
    from .journal import Journal
    from .scoring import (check_prompts, choose_judge, load_scorers, run_scoring, scoring_settings, summarize,
                          summary_columns, write_summary)

    state = process_state(args.cpu, args.threads)
    concept, anti = concept_texts(args)
    judge = choose_judge(args, concept, anti)
    root, records = load_run(args.run_path)
    out = Path(args.out) if args.out else root
    device = device_for(state, args.cpu)
    scorers = load_scorers(args, concept=concept, anti=anti, device=device, dtype=torch_dtype(args.dtype, device))
    check_prompts(scorers, [r["prompt"] for r in records])
    settings = scoring_settings(scorers, judge)
    journal = Journal(out, "scores", settings, state, overwrite=args.overwrite)
    scores = run_scoring(records, root=root, scorers=scorers, judge=judge, journal=journal, state=state,
                         batch_size=args.clip_batch_size, progress=args.progress)
    if state.is_main_process:
        columns = summary_columns(scorers, judge)
        table = write_summary(out, summarize(scores, columns), settings, columns)
        notes = []
        if judge is None:
            notes.append("no scorer judges a concept: pass --concept / --anti-concept (or --prompt-set) for CLIP's "
                         "concept rate, --scorers nudenet, or --scorers toy --toy-concept WORD")
        if not any(r.get("mode") == "unsteered" for r in records):
            notes.append("no unsteered images in this run: drift needs them (dsas generate --compare, or dsas sweep)")
        echo(state, table, *notes, f"scores in {out / 'scores.jsonl'}, summary in {out / 'summary.md'}")
    return 0


def load_run(path: str) -> tuple[Path, list[dict]]:
    """(folder the image paths are relative to, records) of a run folder or a JSONL file."""
    p = Path(path)
    if p.is_dir():
        results = p / "results.jsonl"
        if not results.is_file():
            if list(p.glob("results.part-*.jsonl")):
                raise CLIError(f"the generation in {p} has not finished (results.jsonl is not written yet); run the "
                               "same dsas generate / sweep command again to finish it")
            raise CLIError(f"{p} holds no results.jsonl; pass a folder written by `dsas generate` or a JSONL file of "
                           '{"image": ..., "prompt": ...} records')
        return p, _records(results)
    if not p.is_file():
        raise CLIError(f"{p} does not exist; pass a folder written by `dsas generate` or a JSONL file")
    return p.parent, _records(p)


def _records(path: Path) -> list[dict]:
    records = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CLIError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); pass a run folder or a JSONL file "
                       "of records") from None
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CLIError(f"{path}, line {line_no} is not valid JSON ({e.msg}); one JSON object per line") from None
        if not isinstance(rec, dict) or not rec.get("image") or not rec.get("prompt"):
            raise CLIError(f"{path}, line {line_no} has no 'image' and 'prompt'; each record needs both")
        key = rec.get("key") or rec["image"]
        records.append({"key": key, "unit": rec.get("unit") or key, "variant": rec.get("variant") or "images",
                        "mode": rec.get("mode"), "alpha": rec.get("alpha"), "group": rec.get("group") or "all",
                        "seed": rec.get("seed"), **rec})
    if not records:
        raise CLIError(f"{path} holds no records; nothing to evaluate")
    return records
