"""`dsas fit` and `dsas generate` read the pipeline family from model_index.json: a saved SD3 folder
is loaded as the named SD3 pipeline, fitted on its three text encoders and transformer, and drawn."""

import json

import pytest

from dsas_diffusion import DSASStableDiffusion3Pipeline, Steering

from tests.conftest import CONCEPT_CONTROL, CONCEPT_SOURCE, CONCEPT_TARGET
from tests.diffusion.tiny_pipelines import save_tiny_pipeline


def run_cli(*args) -> int:
    from dsas_diffusion.cli import main

    return main([str(a) for a in args] + ["--cpu"])


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return save_tiny_pipeline("stable_diffusion_3", tmp_path_factory.mktemp("tiny-sd3"))


def test_the_family_is_read_from_model_index(sd3_dir):
    from dsas_diffusion.cli.common import load_pipeline

    assert json.loads((sd3_dir / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    assert type(load_pipeline(str(sd3_dir), dtype=None, device="cpu")) is DSASStableDiffusion3Pipeline


def test_an_unsupported_pipeline_is_refused_with_the_supported_ones(tmp_path, sd3_dir):
    index = json.loads((sd3_dir / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    with pytest.raises(Exception, match="KandinskyPipeline, which DSAS does not steer.*FluxPipeline"):
        from dsas_diffusion.cli.common import load_pipeline

        load_pipeline(str(tmp_path), dtype=None, device="cpu")


def test_fit_then_generate_on_an_sd3_folder(sd3_dir, tmp_path):
    files = {}
    for role, lines in (("source", CONCEPT_SOURCE), ("target", CONCEPT_TARGET), ("control", CONCEPT_CONTROL)):
        files[role] = tmp_path / f"{role}.txt"
        files[role].write_text("\n".join(lines) + "\n")
    out = tmp_path / "steering"
    assert run_cli("fit", "--model", sd3_dir, "--source", files["source"], "--target", files["target"], "--control",
                   files["control"], "--method", "mean_shift", "--pca-rank", 10, "--steps", 1, "--batch-size", 12,
                   "--out", out, "--no-progress") == 0
    steering = Steering.from_pretrained(out)
    assert {n.split(".")[0] for n in steering.layers} == {"text_encoder", "text_encoder_2", "text_encoder_3",
                                                          "transformer"}
    assert run_cli("fit", "--model", sd3_dir, "--prompt-set", tmp_path, "--steer", "unet", "--out",
                   tmp_path / "other", "--no-progress") != 0  # SD3's denoiser is a transformer
    images = tmp_path / "images"
    assert run_cli("generate", "--steering", out, "--prompt", "a banana on the road", "--seeds", 0, "--steps", 2,
                   "--out", images, "--no-progress") == 0
    assert list(images.rglob("*.png"))
