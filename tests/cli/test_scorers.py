"""Scorers through the `dsas` command: fit -> generate -> eval -> sweep offline on the shipped toy
checkpoint, judged by the toy world's pixel rules (no CLIP, no hub), and every scorer that cannot be
loaded or cannot read the prompts refused before the first image is drawn."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dsas_diffusion.toy import t2i_world
from dsas_diffusion.toy.t2i_eval import concept_split

from .conftest import run_cli, write_lines

TOY = Path(__file__).resolve().parents[2] / "assets" / "toy-t2i"
STEPS = ["--steps", "8", "--no-progress"]
TOY_JUDGE = ["--scorers", "toy", "--toy-concept", "red"]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def error_of(capsys, *args) -> str:
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def toy_prompts(tmp_path_factory):
    split = concept_split("red", "blue")
    d = tmp_path_factory.mktemp("toy-prompts")
    files = {"source": split.source, "target": split.target, "control": split.control,
             "heldout_source": split.held_out_source[:2], "heldout_control": split.held_out_control[:2]}
    return {name: write_lines(d / f"{name}.txt", lines) for name, lines in files.items()}


@pytest.fixture(scope="module")
def toy_steering(toy_prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy-fit") / "no-red"
    assert run_cli("fit", "--model", TOY, "--source", toy_prompts["source"], "--target", toy_prompts["target"],
                   "--control", toy_prompts["control"], "--method", "mean_shift", "--steer", "text_encoder",
                   "--out", out, "--no-progress") == 0
    return out


def sweep_args(steering, prompts, out, *extra):
    return ["sweep", "--steering", steering, "--prompts", prompts["heldout_source"], "--control-prompts",
            prompts["heldout_control"], "--alphas", "1", "--seeds", "0", "--out", out, *STEPS, *extra]


def test_fit_generate_eval_sweep_offline_on_the_toy_checkpoint(toy_steering, toy_prompts, tmp_path, capsys):
    gen = tmp_path / "gen"
    assert run_cli("generate", "--steering", toy_steering, "--prompts", toy_prompts["heldout_source"],
                   "--control-prompts", toy_prompts["heldout_control"], "--seeds", "0", "--compare", "--out", gen,
                   *STEPS) == 0
    assert run_cli("eval", gen, *TOY_JUDGE, "--no-progress") == 0
    assert "| faithful (toy rules) | concept rate (toy) |" in capsys.readouterr().out
    records = {r["key"]: r for r in read_jsonl(gen / "results.jsonl")}
    scores = read_jsonl(gen / "scores.jsonl")
    assert {s["key"] for s in scores} == set(records) and len(scores) == 3 * 4
    for s in scores:  # the oracle: the world's rules on the image file
        pixels = np.asarray(Image.open(gen / records[s["key"]]["image"]).convert("RGB"))
        scene = t2i_world.parse(s["prompt"])
        colour, shape = t2i_world.colour_of(pixels, scene.background), t2i_world.shape_of(pixels, scene.background)
        assert (s["toy_colour"], s["toy_shape"]) == (colour, shape)
        assert s["toy_faithful"] == (colour == scene.colour and shape == scene.shape)
        assert s["is_concept"] == ("red" in (colour, shape)) and s["concept_prob"] == float(s["is_concept"])
        assert "clip_score" not in s and (s["drift_pixel"] is None) == (s["mode"] == "unsteered")
    settings = json.loads((gen / "scores.settings.json").read_text())
    assert settings == {"scorers": ["toy"], "concept_by": "toy", "toy_concept": "red"}

    out = tmp_path / "sweep"
    assert run_cli(*sweep_args(toy_steering, toy_prompts, out, *TOY_JUDGE)) == 0
    doc = json.loads((out / "pareto.json").read_text())
    assert doc["x"]["metric"] == "drift_pixel" and doc["y"]["judge"] == "toy"
    points = {(p["mode"], p["alpha"]): p for p in doc["points"]}
    assert set(points) == {("unsteered", 0.0), ("plain", 1.0), ("dsas", 1.0)}
    assert points[("unsteered", 0.0)]["concept"] == 1.0  # the shipped model draws red when asked
    assert points[("dsas", 1.0)]["control_drift"] < points[("plain", 1.0)]["control_drift"]
    assert "toy_faithful_control" in points[("dsas", 1.0)]
    swept = {r["key"]: r for r in read_jsonl(out / "results.jsonl")}
    for key, rec in records.items():  # same prompt, seed and steps: the same image as `dsas generate` drew
        assert (out / swept[key]["image"]).read_bytes() == (gen / rec["image"]).read_bytes(), key


def test_unloadable_scorers_are_refused_before_any_image(toy_steering, toy_prompts, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    monkeypatch.setitem(sys.modules, "nudenet", None)  # as if the extra were not installed
    err = error_of(capsys, *sweep_args(toy_steering, toy_prompts, out, "--scorers", "nudenet"))
    assert 'pip install "dsas-diffusion[nudenet]"' in err
    err = error_of(capsys, *sweep_args(toy_steering, toy_prompts, out, "--concept", "red", "--anti-concept", "blue",
                                       "--clip-model", tmp_path / "no-clip"))
    assert "could not load the CLIP model" in err and "--clip-model" in err
    other = write_lines(tmp_path / "photos.txt", ["a photo of a banana"])
    err = error_of(capsys, *sweep_args(toy_steering, {**toy_prompts, "heldout_control": other}, out, *TOY_JUDGE))
    assert "--scorers toy: the toy scorer reads only captions of the toy world" in err
    assert "'a photo of a banana' is not one" in err
    assert not out.exists()  # nothing generated, not even the folder


@pytest.mark.parametrize("args, message", [
    (["--scorers", "toy"], "pass --concept TEXT and --anti-concept TEXT (or --prompt-set) for the clip scorer, or "
                           "--scorers nudenet, or --scorers toy --toy-concept WORD"),
    (["--scorers", "toy", "--concept-by", "toy"], "the toy scorer cannot judge the concept: pass a concept of the "
                                                  "toy world (--toy-concept"),
    (["--scorers", "toy", "--toy-concept", "red", "--concept-by", "clip"], "'clip' is not among the scorers ['toy']"),
    ([*TOY_JUDGE, "--drift", "clip"], "--drift clip needs the clip scorer; add clip to --scorers (now toy) or pass "
                                      "--drift pixel"),
    ([*TOY_JUDGE, "--concept", "red", "--anti-concept", "blue"], "texts are read by the clip scorer only"),
])
def test_scorer_options_that_cannot_work_together(toy_steering, toy_prompts, tmp_path, capsys, args, message):
    assert message in error_of(capsys, *sweep_args(toy_steering, toy_prompts, tmp_path / "sweep", *args))
    assert not (tmp_path / "sweep").exists()


def test_eval_refuses_prompts_its_scorers_cannot_read(tmp_path, capsys):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "results.jsonl").write_text('{"key": "a", "image": "a.png", "prompt": "a banana"}\n')
    assert "the prompt 'a banana' is not one" in error_of(capsys, "eval", tmp_path, "--scorers", "toy")
    assert not (tmp_path / "scores.jsonl").exists()
    with pytest.raises(SystemExit) as e:
        run_cli("eval", tmp_path, "--scorers", "toy,clipp")
    assert e.value.code == 2 and "'clipp' is not a scorer; choose from clip, nudenet, toy" in capsys.readouterr().err


def test_eval_with_nudenet(tmp_path, capsys):
    pytest.importorskip("nudenet", reason='the nudenet extra is not installed (pip install "dsas-diffusion[nudenet]")')
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 60 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    write_lines(tmp_path / "run.jsonl", [json.dumps({"image": f"{i}.png", "prompt": "a wall"}) for i in range(2)])
    assert run_cli("eval", tmp_path / "run.jsonl", "--scorers", "nudenet", "--no-progress") == 0
    assert "| nudity rate | NudeNet score | concept rate (nudenet) |" in capsys.readouterr().out
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert [(r["nudity_rate"], r["concept_rate"]) for r in rows] == [(0.0, 0.0)]
