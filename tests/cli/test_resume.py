"""Long runs write as they go and resume where they stopped; an interruption never leaves a
half-written file behind."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import dsas_diffusion.cli.generation as generation
import dsas_diffusion.cli.scoring as scoring

from .conftest import ANTI_CONCEPT, CONCEPT, GEN, HELD_OUT_CONCEPT, HELD_OUT_CONTROL, run_cli, write_lines


def generate(steering_dir, prompts, out, *extra):
    return run_cli("generate", "--steering", steering_dir, "--prompts", prompts["heldout_source"],
                   "--control-prompts", prompts["heldout_control"], "--seeds", "0,1", "--out", out, *GEN, *extra)


class Interrupt:
    """Wrap a function; raise KeyboardInterrupt (Ctrl-C) on call number `at`; count the calls."""

    def __init__(self, fn, at=None):
        self.fn, self.at, self.calls = fn, at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.fn(*args, **kwargs)


def no_temporaries(folder):
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_interrupted_generation_resumes_where_it_stopped(steering_dir, prompts, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    render = Interrupt(generation.render, at=4)
    monkeypatch.setattr(generation, "render", render)
    assert generate(steering_dir, prompts, out) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    part = out / "results.part-0.jsonl"
    assert len(part.read_text().splitlines()) == 3 and not (out / "results.jsonl").exists()
    assert len(list((out / "images").rglob("*.png"))) == 3 and no_temporaries(out)

    render = Interrupt(generation.render.fn)
    monkeypatch.setattr(generation, "render", render)
    assert generate(steering_dir, prompts, out) == 0
    assert render.calls == 8 - 3  # 4 prompts x 2 seeds, 3 done before the interruption
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 8 and not part.exists() and no_temporaries(out)

    fresh = tmp_path / "fresh"
    assert generate(steering_dir, prompts, fresh) == 0
    assert (fresh / "results.jsonl").read_text() == (out / "results.jsonl").read_text()
    for rec in records:
        assert (fresh / rec["image"]).read_bytes() == (out / rec["image"]).read_bytes()
        assert (fresh / rec["overlay"]).read_bytes() == (out / rec["overlay"]).read_bytes()

    calls = render.calls
    assert generate(steering_dir, prompts, out) == 0  # finished: nothing left to draw
    assert render.calls == calls


def test_a_line_cut_short_by_a_crash_is_dropped(steering_dir, prompts, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(generation, "render", Interrupt(generation.render, at=3))
    assert generate(steering_dir, prompts, out) == 130
    part = out / "results.part-0.jsonl"
    part.write_text(part.read_text() + '{"key": "dsas-a1/concept-0000')  # power cut in the middle of a line
    render = Interrupt(generation.render.fn)
    monkeypatch.setattr(generation, "render", render)
    assert generate(steering_dir, prompts, out) == 0
    assert render.calls == 8 - 2
    assert len((out / "results.jsonl").read_text().splitlines()) == 8


def test_interrupted_image_write_leaves_no_file(steering_dir, prompts, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def half_then_interrupt(fd):
        os.ftruncate(fd, 20)  # the first image file is half written when the interruption comes
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", half_then_interrupt)
    assert generate(steering_dir, prompts, out) == 130
    assert not list(out.rglob("*.png")) and no_temporaries(out)
    assert not (out / "results.part-0.jsonl").exists()


def test_interrupted_scoring_resumes(steering_dir, prompts, clip_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert generate(steering_dir, prompts, out) == 0
    args = ["eval", out, "--clip-model", clip_dir, "--clip-batch-size", 2, "--no-progress",
            "--concept", "a banana", "--anti-concept", "an apple"]
    monkeypatch.setattr(scoring, "_score_units", Interrupt(scoring._score_units, at=3))
    assert run_cli(*args) == 130
    assert len((out / "scores.part-0.jsonl").read_text().splitlines()) == 4
    score = Interrupt(scoring._score_units.fn)
    monkeypatch.setattr(scoring, "_score_units", score)
    assert run_cli(*args) == 0
    assert score.calls == 2  # the 4 remaining images, 2 per CLIP batch
    assert len((out / "scores.jsonl").read_text().splitlines()) == 8


def test_other_settings_are_refused_unless_overwritten(steering_dir, prompts, tmp_path, capsys):
    out = tmp_path / "run"
    assert generate(steering_dir, prompts, out) == 0
    code = run_cli("generate", "--steering", steering_dir, "--prompts", prompts["heldout_source"], "--steps", 2,
                   "--out", out, "--no-progress")
    assert code == 2
    assert "other settings (steps: 3 -> 2); pass --overwrite" in capsys.readouterr().err
    assert run_cli("generate", "--steering", steering_dir, "--prompts", prompts["heldout_source"], "--steps", 2,
                   "--out", out, "--no-progress", "--overwrite") == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 2


def test_images_drawn_again_are_scored_again(steering_dir, prompts, clip_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["eval", out, "--clip-model", clip_dir, "--no-progress"]
    assert generate(steering_dir, prompts, out) == 0 and run_cli(*args) == 0
    score = Interrupt(scoring._score_units)
    monkeypatch.setattr(scoring, "_score_units", score)
    assert run_cli(*args) == 0 and score.calls == 0  # all scored already
    assert generate(steering_dir, prompts, out, "--guidance", 3, "--overwrite") == 0  # other images, same names
    assert run_cli(*args) == 0 and score.calls > 0
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [s["image_sha256"] for s in scores] == [r["image_sha256"] for r in results]


def test_changed_prompt_file_is_refused(steering_dir, prompts, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("generate", "--steering", steering_dir, "--prompt", "a banana on a boat", "--out", out, *GEN) == 0
    assert run_cli("generate", "--steering", steering_dir, "--prompt", "a dog on a boat", "--out", out, *GEN) == 2
    assert "another prompt or seed ('a banana on a boat', seed 0)" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["results", "scores"])
def test_damaged_journal_line_is_reported(tmp_path, stage):
    from dsas_diffusion.cli.common import CLIError
    from dsas_diffusion.cli.journal import _read_jsonl

    path = tmp_path / f"{stage}.jsonl"
    path.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(CLIError, match="line 2 is damaged; delete that line"):
        _read_jsonl(path)


def test_compare_strips_are_drawn_again_with_their_images(steering_dir, tmp_path, capsys):
    from dsas_diffusion.cli.generation import Variant, comparison_caption
    from dsas_diffusion.eval import compare_strip

    out = tmp_path / "run"
    command = ["generate", "--steering", steering_dir, "--prompt", "a banana on the road", "--compare", "--out", out,
               *GEN]

    def strip(alpha):
        return out / "compare" / f"concept-00000-s0-a{alpha}.png"

    def strip_of(alpha):
        variants = [Variant("unsteered"), Variant("plain", alpha), Variant("dsas", alpha)]
        images = [Image.open(out / "images" / v.name / "concept-00000-s0.png").convert("RGB") for v in variants]
        return np.asarray(compare_strip(images, [v.label for v in variants],
                                        caption=comparison_caption("a banana on the road", 0, alpha)))

    assert run_cli(*command) == 0
    assert np.array_equal(np.asarray(Image.open(strip(1))), strip_of(1))
    first = strip(1).read_bytes()
    capsys.readouterr()
    assert run_cli(*command, "--alpha", 2) == 2  # another alpha into the same folder: another run, refused
    assert "other settings (alpha: 1.0 -> 2.0); pass --overwrite" in capsys.readouterr().err
    assert not strip(2).exists()
    assert run_cli(*command, "--alpha", 2, "--overwrite") == 0
    assert np.array_equal(np.asarray(Image.open(strip(2))), strip_of(2))
    assert strip(1).read_bytes() == first  # the alpha-1 strip has a name of its own: never replaced by another's
    before = strip(2).read_bytes()
    assert run_cli(*command, "--alpha", 2, "--guidance", 3, "--overwrite") == 0  # every image drawn again
    assert np.array_equal(np.asarray(Image.open(strip(2))), strip_of(2)) and strip(2).read_bytes() != before


def test_a_smaller_sweep_into_the_same_folder_reports_only_its_own_images(sweep_dir, steering_dir, clip_dir,
                                                                          tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    shutil.copytree(sweep_dir, out)
    render, score = Interrupt(generation.render), Interrupt(scoring._score_units)
    monkeypatch.setattr(generation, "render", render)
    monkeypatch.setattr(scoring, "_score_units", score)
    concept = write_lines(tmp_path / "concept.txt", HELD_OUT_CONCEPT[:1])
    control = write_lines(tmp_path / "control.txt", HELD_OUT_CONTROL[:1])
    assert run_cli("sweep", "--steering", steering_dir, "--prompts", concept, "--control-prompts", control,
                   "--concept", CONCEPT[0], *[a for t in ANTI_CONCEPT for a in ("--anti-concept", t)],
                   "--alphas", "1", "--clip-model", clip_dir, "--out", out, *GEN) == 0
    assert render.calls == 0 and score.calls == 0  # all drawn and scored by the first sweep
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert {(r["variant"], r["group"], r["n"]) for r in rows} == {
        (v, g, 1) for v in ("unsteered", "plain-a1", "dsas-a1") for g in ("concept", "control")}
    assert [p["variant"] for p in json.loads((out / "pareto.json").read_text())["points"]] == [
        "unsteered", "plain-a1", "dsas-a1"]
    results = (out / "results.jsonl").read_text().splitlines()
    assert len(results) == 4 * 5 == len((out / "scores.jsonl").read_text().splitlines())  # the files keep all


def test_scores_of_another_clip_dtype_are_not_reused(sweep_dir, prompts, clip_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    shutil.copytree(sweep_dir, out)
    code = run_cli("eval", out, "--clip-model", clip_dir, "--prompt-set", prompts["dir"], "--dtype", "bfloat16",
                   "--no-progress")
    assert code == 2
    assert "other settings (clip_dtype: 'float32' -> 'bfloat16'); pass --overwrite" in capsys.readouterr().err
