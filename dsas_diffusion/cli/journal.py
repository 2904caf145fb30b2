"""Results written as they go, resumed where they stopped, merged across processes.

A stage of a run (`results` for images, `scores` for evaluation) keeps, in its output folder:

- `NAME.settings.json`: the settings every record depends on; a run started again with other
  settings is refused (--overwrite discards the earlier records and starts again);
- `NAME.part-RANK.jsonl`: while running, each process appends one JSON line per finished item
  to its own part (one `write` per line, then fsync), after the item's files were written
  atomically; so an interrupted run loses at most the item in progress;
- `NAME.jsonl`: when every process is done, the main process merges the parts (in item order)
  into this file, written atomically, and removes them.

Starting again, the main process first merges the parts an interrupted run left (whatever the
number of processes was; they are newer than `NAME.jsonl`, so their records win) into
`NAME.jsonl` and removes them, before anyone appends; then every process reads that one file,
skips what is done and splits the rest between the processes. A last line cut short by a crash
(no newline) is ignored and dropped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..core.io import write_text_atomic
from .common import CLIError


class Journal:
    def __init__(self, folder: str | os.PathLike, name: str, settings: dict, state, overwrite: bool = False):
        self.folder, self.name, self.settings, self.state = Path(folder), name, settings, state
        self.final = self.folder / f"{name}.jsonl"
        self.settings_path = self.folder / f"{name}.settings.json"
        self.part = self.folder / f"{name}.part-{state.process_index}.jsonl"
        self.overwrite = overwrite
        self.records: dict[str, dict] = {}

    # ---- starting ------------------------------------------------------------------------------
    def open(self) -> dict[str, dict]:
        """Check (or write) the settings, then load every finished record: {key: record}."""
        if self.state.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._check_settings()
            if self._parts():  # an interrupted run's parts: merged now, so an old one never outranks a new one
                self._merge()
        self.state.wait_for_everyone()  # nobody reads before the merge, nobody appends before the parts are gone
        self.records = self._load()
        return self.records

    def _check_settings(self) -> None:
        canonical = json.loads(json.dumps(self.settings))
        if self.overwrite:  # start again: earlier records go (their files are overwritten as the run goes)
            for path in [self.final, *self._parts()]:
                path.unlink(missing_ok=True)
            saved = None
        else:
            saved = _read_json(self.settings_path) if self.settings_path.exists() else None
        if saved is not None and saved != canonical:
            changed = sorted(k for k in set(saved) | set(canonical) if saved.get(k) != canonical.get(k))
            detail = ", ".join(f"{k}: {saved.get(k)!r} -> {canonical.get(k)!r}" for k in changed[:4])
            raise CLIError(f"{self.folder} holds {self.name} made with other settings ({detail}); pass "
                           "--overwrite to discard them and start again, or choose another --out")
        if saved != canonical:
            write_text_atomic(self.settings_path, json.dumps(canonical, indent=2, sort_keys=True) + "\n")

    def _parts(self) -> list[Path]:
        return sorted(self.folder.glob(f"{self.name}.part-*.jsonl"))

    def _load(self) -> dict[str, dict]:
        """NAME.jsonl, then this run's parts (newer; each key in one part at most), the later winning."""
        records = {}
        for path in [self.final, *self._parts()]:
            if path.exists():
                for rec in _read_jsonl(path):
                    records[rec["key"]] = rec
        return records

    def _merge(self, order: list[str] = ()) -> None:
        """Main process: NAME.jsonl and the parts into NAME.jsonl (items in `order` first, then any older
        ones), written atomically; then the parts go (a crash in between merges them again, harmlessly)."""
        records = self._load()
        rank = {k: i for i, k in enumerate(order)}
        keys = sorted(records, key=lambda k: (rank.get(k, len(rank)), k)) if rank else list(records)
        write_text_atomic(self.final, "".join(json.dumps(records[k], sort_keys=True, allow_nan=False) + "\n"
                                              for k in keys))
        for path in self._parts():
            path.unlink()

    # ---- running -------------------------------------------------------------------------------
    def append(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
        fd = os.open(self.part, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records[record["key"]] = record

    # ---- finishing -----------------------------------------------------------------------------
    def finish(self, order: list[str]) -> list[dict]:
        """Merge every process's part into NAME.jsonl, which keeps every record, older ones too; every
        process gets back the records of this run's items (those in `order`), in that order."""
        self.state.wait_for_everyone()
        if self.state.is_main_process:
            self._merge(order)
        self.state.wait_for_everyone()
        keep = set(order)
        return [rec for rec in _read_jsonl(self.final) if rec["key"] in keep]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CLIError(f"{path} is damaged ({e.msg}); delete it, or pass --overwrite to start again") from None


def _read_jsonl(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):  # the last line has no newline: cut short by a crash
                continue
            raise CLIError(f"{path}, line {i} is damaged; delete that line (or the file) and run again") from None
        if not isinstance(rec, dict) or "key" not in rec:
            raise CLIError(f"{path}, line {i} is not a dsas record (no 'key'); was the file written by dsas?")
        out.append(rec)
    return out
