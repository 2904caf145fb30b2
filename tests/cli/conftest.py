"""Fixtures of the CLI tests: prompt files, a tiny CLIP model, and a steering fitted through `dsas fit`.

Every model runs with one torch thread here: on a shared 2-core machine, two OpenMP threads
fighting another process for the cores make these tiny models up to 50x slower, and one thread
is also what each process gets under `accelerate launch` on CPU, so 1- and 2-process runs are
bit-identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import CONCEPT_CONTROL, CONCEPT_SOURCE, CONCEPT_TARGET, TOKENIZER_DIR, one_torch_thread

HELD_OUT_CONCEPT = ["a banana on the road", "a cute banana near a tree"]
HELD_OUT_CONTROL = ["a photo of a cow on the road", "a cute rabbit near a tree"]
CONCEPT = ["a photo of a banana"]
ANTI_CONCEPT = ["a photo of an apple", "a photo of a dog"]
GEN = ["--steps", "3", "--no-progress"]


def run_cli(*args) -> int:
    """`dsas ARGS --cpu` in this process (on CPU, so a GPU box gives the same bits as the references)."""
    from dsas_diffusion.cli import main

    return main([str(a) for a in args] + ["--cpu"])


one_thread = pytest.fixture(autouse=True, scope="package")(one_torch_thread)


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def prompts(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("prompts")
    files = {"source": CONCEPT_SOURCE, "target": CONCEPT_TARGET, "control": CONCEPT_CONTROL,
             "heldout_source": HELD_OUT_CONCEPT, "heldout_control": HELD_OUT_CONTROL,
             "concept": CONCEPT, "anti_concept": ANTI_CONCEPT}
    return {name: write_lines(d / f"{name}.txt", lines) for name, lines in files.items()} | {"dir": d}


def save_tiny_clip(path: Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    text = dict(vocab_size=512, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    CLIPTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def steering_dir(sd_dir, prompts, tmp_path_factory) -> Path:
    """`dsas fit` on the tiny pipeline (text encoder and UNet), as a user runs it."""
    out = tmp_path_factory.mktemp("fit") / "no-banana"
    torch.set_num_threads(1)
    code = run_cli("fit", "--model", sd_dir, "--prompt-set", prompts["dir"], "--method", "mean_shift",
                   "--pca-rank", 10, "--steps", 3, "--out", out, "--report", out.parent / "report.json",
                   "--no-progress")
    assert code == 0
    return out


@pytest.fixture(scope="session")
def sweep_dir(steering_dir, prompts, clip_dir, tmp_path_factory) -> Path:
    """A 1-process `dsas sweep` (the reference the 2-process run is compared with)."""
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    torch.set_num_threads(1)
    code = run_cli("sweep", "--steering", steering_dir, "--prompt-set", prompts["dir"], "--alphas", "1,2",
                   "--clip-model", clip_dir, "--out", out, *GEN)
    assert code == 0
    return out
