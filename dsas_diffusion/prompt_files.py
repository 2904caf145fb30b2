"""Reading prompt files: plain text (one prompt per line), CSV / TSV and JSONL with a column name,
I2P-style CSV files with a seed and a guidance scale per row, and prompt-set folders.

Plain text: blank lines and lines starting with `#` are skipped. CSV / JSONL: the column is
`prompt` unless told otherwise (a file with a single column needs no name). Per-row seeds and
guidance scales are read from the first column present among `SEED_COLUMNS` / `GUIDANCE_COLUMNS`
(I2P: `sd_seed`, `sd_guidance_scale`; the concept-erasure CSVs: `evaluation_seed`,
`evaluation_guidance`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_COLUMN = "prompt"
SEED_COLUMNS = ("sd_seed", "evaluation_seed", "seed")
GUIDANCE_COLUMNS = ("sd_guidance_scale", "evaluation_guidance", "guidance_scale", "guidance")
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}
JSONL_SUFFIXES = (".jsonl", ".ndjson")

# The files of a prompt-set folder (see assets/prompts/README.md).
PROMPT_SET_FILES = {
    "source": "source.txt", "target": "target.txt", "control": "control.txt",
    "heldout_source": "heldout_source.txt", "heldout_control": "heldout_control.txt",
    "concept": "concept.txt", "anti_concept": "anti_concept.txt",
}


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class PromptRow:
    """One prompt, with the seed and guidance scale its file gives it (None: use the command's)."""

    text: str
    row: int
    seed: int | None = None
    guidance_scale: float | None = None


def read_prompts(path: str | os.PathLike, column: str | None = None) -> list[str]:
    """The prompts of a text, CSV / TSV or JSONL file, in file order."""
    return [r.text for r in read_prompt_rows(path, column)]


def read_prompt_rows(path: str | os.PathLike, column: str | None = None) -> list[PromptRow]:
    """Prompts with their per-row seed and guidance scale (I2P-style files), in file order."""
    path = Path(path)
    if not path.exists():
        raise PromptFileError(f"prompt file {path} does not exist; check the path")
    if path.is_dir():
        raise PromptFileError(f"{path} is a folder; pass a prompt file (.txt, .csv, .tsv or .jsonl) inside it")
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        rows = _table_rows(path, TABLE_SUFFIXES[suffix], column)
    elif suffix in JSONL_SUFFIXES:
        rows = _jsonl_rows(path, column)
    else:
        if column is not None:
            raise PromptFileError(f"{path} is a plain text file (one prompt per line) and has no columns; "
                                  "drop --column, or give a .csv / .jsonl file")
        rows = _text_rows(path)
    if not rows:
        raise PromptFileError(f"{path} holds no prompts (blank lines and # comments are skipped); "
                              "write one prompt per line")
    return rows


def is_table(path: str | os.PathLike) -> bool:
    """True for the files that have columns (CSV, TSV, JSONL)."""
    suffix = Path(path).suffix.lower()
    return suffix in TABLE_SUFFIXES or suffix in JSONL_SUFFIXES


def prompt_set_file(folder: str | os.PathLike, role: str) -> Path:
    """The file of a prompt-set folder for `role` (source, target, control, heldout_source, ...)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PromptFileError(f"prompt set {folder} is not a folder; pass a folder such as assets/prompts/banana")
    path = folder / PROMPT_SET_FILES[role]
    if not path.is_file():
        raise PromptFileError(f"prompt set {folder} has no {path.name}; add it or pass the file explicitly")
    return path


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{path} is not UTF-8 text ({e}); save it as UTF-8") from None


def _text_rows(path: Path) -> list[PromptRow]:
    lines = [line.strip() for line in _read_text(path).splitlines()]
    return [PromptRow(text, i) for i, text in enumerate(t for t in lines if t and not t.startswith("#"))]


def _pick_column(path: Path, columns: list[str], column: str | None) -> str:
    if column is not None:
        if column not in columns:
            raise PromptFileError(f"{path} has no column {column!r}; its columns are: {', '.join(columns)}. "
                                  "Pass --column with one of them")
        return column
    if DEFAULT_COLUMN in columns:
        return DEFAULT_COLUMN
    if len(columns) == 1:
        return columns[0]
    raise PromptFileError(f"{path} has no {DEFAULT_COLUMN!r} column; its columns are: {', '.join(columns)}. "
                          "Pass --column with the one that holds the prompts")


def _rows_from_records(path: Path, records: list[tuple[int, dict]], columns: list[str], column: str | None):
    name = _pick_column(path, columns, column)
    seed_col = next((c for c in SEED_COLUMNS if c in columns and c != name), None)
    guide_col = next((c for c in GUIDANCE_COLUMNS if c in columns and c != name), None)
    rows = []
    for line, rec in records:
        text = rec.get(name)
        text = "" if text is None else str(text).strip()
        if not text:
            raise PromptFileError(f"{path}, line {line}: the {name!r} value is missing or empty; fill it in or "
                                  "remove the row")
        seed = _number(path, line, seed_col, rec.get(seed_col), int) if seed_col else None
        guidance = _number(path, line, guide_col, rec.get(guide_col), float) if guide_col else None
        rows.append(PromptRow(text, len(rows), seed, guidance))
    return rows


# per-row values take the range the `dsas` options take (`cli/arguments.py`)
ROW_RANGES = {int: (0, 2**32 - 1, "a seed"), float: (0, 100, "a guidance scale")}


def _number(path: Path, line: int, col: str, value, kind):
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    lo, hi, what = ROW_RANGES[kind]
    try:
        number = float(value)
        if not math.isfinite(number) or (kind is int and number != int(number)):
            raise ValueError
    except (TypeError, ValueError):
        raise PromptFileError(f"{path}, line {line}: {col}={value!r} is not {what} (a finite "
                              f"{'whole ' if kind is int else ''}number); fix the value or remove the column") from None
    if not lo <= number <= hi:
        raise PromptFileError(f"{path}, line {line}: {col}={value!r} is out of range; {what} lies between {lo} and "
                              f"{hi}: fix the value or remove the column")
    return int(number) if kind is int else number


def _table_rows(path: Path, delimiter: str, column: str | None) -> list[PromptRow]:
    text = _read_text(path)
    # a file object, not text.splitlines(): quoted fields may span lines (and hold U+2028) as CSV allows
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    columns = [c.strip() for c in (reader.fieldnames or [])]
    if not columns:
        raise PromptFileError(f"{path} holds no prompts (it has no header row); the first row must name the columns")
    records = []
    for rec in reader:
        rec = {(k or "").strip(): v for k, v in rec.items()}
        if all(v is None or not str(v).strip() for v in rec.values()):
            continue  # blank line
        records.append((reader.line_num, rec))
    if not records:
        return []
    return _rows_from_records(path, records, columns, column)


def _jsonl_rows(path: Path, column: str | None) -> list[PromptRow]:
    records, columns = [], []
    for line, raw in enumerate(_read_text(path).splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            raise PromptFileError(
                f"{path}, line {line} is not valid JSON ({e.msg}); one JSON object per line") from None
        if isinstance(rec, str):
            rec = {DEFAULT_COLUMN: rec}
        if not isinstance(rec, dict):
            raise PromptFileError(f"{path}, line {line} is a JSON {type(rec).__name__}; each line must be an object "
                                  'such as {"prompt": "a photo of a dog"}')
        columns += [k for k in rec if k not in columns]
        records.append((line, rec))
    if not records:
        return []
    return _rows_from_records(path, records, columns, column)
