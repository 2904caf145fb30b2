"""fit -> generate -> eval -> sweep through the `dsas` command on tiny offline models, checked
against the library and transformers' CLIP as oracles."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dsas_diffusion import DSASStableDiffusionPipeline, Steering

from .conftest import ANTI_CONCEPT, CONCEPT, GEN, HELD_OUT_CONCEPT, HELD_OUT_CONTROL, run_cli


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def gen_dir(steering_dir, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "gen"
    assert run_cli("generate", "--steering", steering_dir, "--prompts", prompts["heldout_source"],
                   "--control-prompts", prompts["heldout_control"], "--seeds", "0", "--compare", "--out", out,
                   *GEN) == 0
    return out


def test_help_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "dsas_diffusion", "--help"], capture_output=True, text=True, check=True)
    for command in ("fit", "generate", "eval", "sweep"):
        assert command in out.stdout


def test_fit_writes_a_steering_folder_and_a_report(steering_dir, sd_dir):
    assert sorted(p.name for p in steering_dir.iterdir()) == ["steering.safetensors", "steering_config.json"]
    steering = Steering.from_pretrained(steering_dir)
    assert steering.config.base_model == str(sd_dir) and steering.config.method == "mean_shift"
    report = json.loads((steering_dir.parent / "report.json").read_text())
    assert set(report["layers"]) == set(steering.layers)
    assert report["steered"] == steering.steered_layers
    assert all(0 <= info["gate_accuracy"] <= 1 for info in report["layers"].values())


def test_generate_matches_the_pipeline_and_records_lambdas(gen_dir, steering_dir, sd_dir):
    records = read_jsonl(gen_dir / "results.jsonl")
    assert [r["variant"] for r in records[:3]] == ["unsteered", "plain-a1", "dsas-a1"]
    assert len(records) == 3 * (len(HELD_OUT_CONCEPT) + len(HELD_OUT_CONTROL))
    pipe = DSASStableDiffusionPipeline.from_pretrained(sd_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.set_steering(steering_dir)
    for rec in records[:3]:  # the oracle: the pipeline called directly with the same seed
        out = pipe(rec["prompt"], num_inference_steps=3, generator=torch.Generator().manual_seed(rec["seed"]),
                   steering_strength=rec["alpha"], gated=rec["mode"] == "dsas")
        assert np.array_equal(np.asarray(Image.open(gen_dir / rec["image"])), np.asarray(out.images[0])), rec["key"]
    dsas = [r for r in records if r["mode"] == "dsas"]
    for rec in dsas:
        assert (gen_dir / rec["overlay"]).is_file()
        assert [t for t, _ in rec["token_lambdas"]] == rec["prompt"].split()
        assert 0 <= rec["image_lambda"] <= 1
    seq = {g: np.mean([r["sequence_lambda"] for r in dsas if r["group"] == g]) for g in ("concept", "control")}
    assert seq["concept"] > seq["control"] + 0.2, seq  # the gate tells held-out concept prompts from control ones
    assert len(list((gen_dir / "compare").glob("*.png"))) == len(HELD_OUT_CONCEPT) + len(HELD_OUT_CONTROL)
    assert not list(gen_dir.rglob("*.tmp")) and not list(gen_dir.glob("*.part-*"))


def test_eval_scores_match_transformers_clip(gen_dir, clip_dir, capsys):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    args = ["--clip-model", clip_dir, "--no-progress"]
    for text in CONCEPT:
        args += ["--concept", text]
    for text in ANTI_CONCEPT:
        args += ["--anti-concept", text]
    assert run_cli("eval", gen_dir, *args) == 0
    assert "| variant | prompts |" in capsys.readouterr().out
    scores = {s["key"]: s for s in read_jsonl(gen_dir / "scores.jsonl")}
    records = read_jsonl(gen_dir / "results.jsonl")
    assert set(scores) == {r["key"] for r in records}

    model, tok = CLIPModel.from_pretrained(clip_dir).eval(), CLIPTokenizer.from_pretrained(clip_dir)
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    texts = CONCEPT + ANTI_CONCEPT
    for rec in records[:3]:
        image = Image.open(gen_dir / rec["image"]).convert("RGB")
        with torch.no_grad():
            out = model(**tok([rec["prompt"]] + texts, padding=True, return_tensors="pt"),
                        pixel_values=proc(images=image, return_tensors="pt").pixel_values)
        cos = out.logits_per_image[0] / model.logit_scale.detach().exp()
        s = scores[rec["key"]]
        assert s["clip_score"] == pytest.approx(100 * max(float(cos[0]), 0), abs=1e-3)
        p = out.logits_per_image[0, 1:].softmax(-1)
        assert s["concept_prob"] == pytest.approx(float(p[:len(CONCEPT)].sum()), abs=1e-3)
        if rec["mode"] == "unsteered":
            assert s["drift_clip"] is None and s["drift_pixel"] is None
        else:
            twin = np.asarray(Image.open(gen_dir / rec["image"].replace(rec["variant"], "unsteered")), dtype=np.float32)
            assert s["drift_pixel"] == pytest.approx(np.abs(np.asarray(image, dtype=np.float32) - twin).mean() / 255,
                                                     abs=1e-5)
    summary = json.loads((gen_dir / "summary.json").read_text())
    assert {(r["variant"], r["group"]) for r in summary["rows"]} == {
        (v, g) for v in ("unsteered", "plain-a1", "dsas-a1") for g in ("concept", "control")}


def test_sweep_writes_a_pareto_front(sweep_dir):
    doc = json.loads((sweep_dir / "pareto.json").read_text())
    points = {(p["mode"], p["alpha"]): p for p in doc["points"]}
    assert set(points) == {("unsteered", 0.0), ("plain", 1.0), ("plain", 2.0), ("dsas", 1.0), ("dsas", 2.0)}
    assert points[("unsteered", 0.0)]["control_drift"] == 0 and points[("unsteered", 0.0)]["pareto_optimal"]
    for alpha in (1.0, 2.0):  # the point of DSAS: control images move less than under plain steering
        assert points[("dsas", alpha)]["control_drift"] < points[("plain", alpha)]["control_drift"]
    assert (sweep_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (sweep_dir / "pareto.md").read_text()
    assert table.count("\n| dsas |") == 2 and "| method | alpha |" in table
    assert len(read_jsonl(sweep_dir / "scores.jsonl")) == 5 * (len(HELD_OUT_CONCEPT) + len(HELD_OUT_CONTROL))
