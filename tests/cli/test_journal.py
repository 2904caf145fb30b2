"""The journal on its own: which records a run gets back, and which of two records of one item wins."""

import json

from dsas_diffusion.cli.journal import Journal


class OneProcess:
    """accelerate's PartialState, as one process sees it."""

    num_processes, process_index, is_main_process = 1, 0, True

    def wait_for_everyone(self):
        pass


def keys_in(path):
    return [json.loads(line)["key"] for line in path.read_text().splitlines()]


def test_finish_returns_only_this_runs_records(tmp_path):
    journal = Journal(tmp_path, "results", {"steps": 3}, OneProcess())
    journal.open()
    for key in "abc":
        journal.append({"key": key})
    assert [r["key"] for r in journal.finish(["a", "b", "c"])] == ["a", "b", "c"]

    journal = Journal(tmp_path, "results", {"steps": 3}, OneProcess())  # a smaller run into the same folder
    assert set(journal.open()) == {"a", "b", "c"}
    assert [r["key"] for r in journal.finish(["b"])] == ["b"]
    assert keys_in(tmp_path / "results.jsonl") == ["b", "a", "c"]  # the file keeps every record, this run's first


def test_parts_of_an_interrupted_run_never_outrank_newer_records(tmp_path):
    # a 2-process run was interrupted; its rank-1 part holds a score of an image since drawn again
    (tmp_path / "scores.part-1.jsonl").write_text('{"key": "a", "v": "old"}\n{"key": "b", "v": "old"}\n')
    journal = Journal(tmp_path, "scores", {}, OneProcess())
    assert journal.open() == {"a": {"key": "a", "v": "old"}, "b": {"key": "b", "v": "old"}}
    journal.append({"key": "a", "v": "new"})  # resumed on one process: rank 0 scores it again
    assert [r["v"] for r in journal.finish(["a", "b"])] == ["new", "old"]
    assert [p.name for p in tmp_path.glob("*.part-*")] == []


def test_open_merges_the_parts_before_anyone_appends(tmp_path):
    (tmp_path / "results.jsonl").write_text('{"key": "a", "v": 1}\n')
    (tmp_path / "results.part-0.jsonl").write_text('{"key": "b", "v": 1}\n{"key": "a", "v": 2}\n{"key": "c"')
    (tmp_path / "results.part-3.jsonl").write_text('{"key": "d", "v": 1}\n')  # from a run on more processes
    journal = Journal(tmp_path, "results", {}, OneProcess())
    assert journal.open() == {"a": {"key": "a", "v": 2}, "b": {"key": "b", "v": 1}, "d": {"key": "d", "v": 1}}
    assert [p.name for p in tmp_path.glob("*.part-*")] == []  # the line cut short by a crash is gone with them
    assert keys_in(tmp_path / "results.jsonl") == ["a", "b", "d"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
