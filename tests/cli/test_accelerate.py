"""`accelerate launch -m dsas_diffusion ...` with 2 CPU processes gives what 1 process gives."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytest.importorskip("accelerate")
REPO = Path(__file__).resolve().parents[2]


def launch(*args, processes: int = 2) -> subprocess.CompletedProcess:
    with socket.socket() as s:  # a free port, so parallel test runs on one machine do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # On a machine without a GPU, accelerate makes CPU processes when ACCELERATE_USE_CPU is set.
    # Whatever thread count the launcher picks (OMP_NUM_THREADS, set here to 2 to make the point),
    # `dsas` runs each process of a split run on one torch thread, like the 1-process reference runs.
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "2", "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), "-m", "dsas_diffusion", *map(str, args), "--cpu"]
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_sweep_on_two_processes_matches_one(sweep_dir, steering_dir, prompts, clip_dir, tmp_path):
    out = tmp_path / "sweep"
    result = launch("sweep", "--steering", steering_dir, "--prompt-set", prompts["dir"], "--alphas", "1,2",
                    "--clip-model", clip_dir, "--out", out, "--steps", 3)
    assert "generating [1]" in result.stderr and "scoring [1]" in result.stderr  # both processes worked
    for name in ("results.jsonl", "scores.jsonl", "summary.json", "pareto.json", "pareto.md"):
        assert (out / name).read_text() == (sweep_dir / name).read_text(), name
    images = sorted(p.relative_to(sweep_dir) for p in sweep_dir.rglob("*.png"))
    assert images == sorted(p.relative_to(out) for p in out.rglob("*.png"))
    for rel in images:
        if rel.name != "pareto.png":
            assert (out / rel).read_bytes() == (sweep_dir / rel).read_bytes(), rel
    assert not list(out.glob("*.part-*.jsonl"))


def test_fit_on_two_processes_matches_one(sd_dir, prompts, steering_dir, tmp_path):
    out = tmp_path / "steering"
    result = launch("fit", "--model", sd_dir, "--prompt-set", prompts["dir"], "--method", "mean_shift",
                    "--pca-rank", 10, "--steps", 3, "--out", out, "--no-progress")
    assert result.stdout.count("saved the steering") == 1
    assert json.loads((out / "steering_config.json").read_text()) == json.loads(
        (steering_dir / "steering_config.json").read_text())
    ours, reference = load_file(out / "steering.safetensors"), load_file(steering_dir / "steering.safetensors")
    assert ours.keys() == reference.keys() and all((ours[k] == reference[k]).all() for k in ours)
