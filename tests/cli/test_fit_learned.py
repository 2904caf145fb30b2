"""`dsas fit` with steering learned through the text encoders (`--method lineas`, `--gates e2e`,
`--gate-activation`, `--training-steps`, `--learning-rate`) and with a conditional steering's gate
sets (`--gate-source` / `--gate-control`): each option reaches the saved steering, and a bad value
or an impossible combination is refused before any model loads."""

from __future__ import annotations

import json

import pytest

from tests.conftest import CONCEPT_CONTROL, CONCEPT_SOURCE

from .conftest import run_cli, write_lines

NO_MODEL = ["fit", "--model", "no-model", "--prompt-set", "no-prompts", "--out", "steering"]


def config_of(folder) -> dict:
    return json.loads((folder / "steering_config.json").read_text())


@pytest.mark.parametrize("option, value, words", [
    ("--training-steps", "0", "at least 1, got 0"),
    ("--learning-rate", "2", "learning rate 2 is not in (0, 1]"),
    ("--learning-rate", "nan", "'nan' is not a finite number"),
    ("--gates", "learned", "invalid choice: 'learned'"),
    ("--gate-activation", "tanh", "invalid choice: 'tanh'"),
    ("--method", "lineaz", "invalid choice: 'lineaz'"),
])
def test_bad_learning_option_is_an_argument_error(option, value, words, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(*NO_MODEL, f"{option}={value}")
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"dsas fit: error: argument {option}: " in err and words in err


@pytest.mark.parametrize("args, words", [
    (["--method", "mean_shift", "--training-steps", "5"], "learns nothing: pass --method lineas or --gates e2e"),
    (["--method", "lineas", "--steer", "both"], "learned through the text encoders only; pass --steer text_encoder"),
    (["--gates", "e2e", "--steer", "unet"], "learned through the text encoders only"),
    (["--gates", "e2e", "--gate-source", "gates.txt"], "end-to-end gates learn from source, target and control"),
])
def test_impossible_learning_combinations_are_refused_before_the_model_loads(args, words, capsys):
    assert run_cli(*NO_MODEL, *args) == 2  # "no-model" would fail to load: the check comes first
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_fit_learns_through_the_text_encoder_with_the_options_given(sd_dir, prompts, tmp_path):
    out = tmp_path / "e2e"
    assert run_cli("fit", "--model", sd_dir, "--prompt-set", prompts["dir"], "--method", "lineas", "--gates", "e2e",
                   "--gate-activation", "relu", "--training-steps", 3, "--learning-rate", "0.01", "--pca-rank", 3,
                   "--out", out, "--no-progress") == 0
    config = config_of(out)
    assert (config["method"], config["gates"], config["gate_activation"]) == ("lineas", "e2e", "relu")
    assert config["training"]["steps"] == 3 >= config["training"]["steps_run"] and config["training"]["lr"] == 0.01
    assert set(config["targets"]) == {"text_encoder"}  # learned steering stays in the text encoder by default


def test_fit_takes_the_gates_from_gate_prompt_files(sd_dir, prompts, tmp_path):
    gate_source = write_lines(tmp_path / "gate_source.txt", [p.replace("banana", "dog") for p in CONCEPT_SOURCE])
    gate_control = write_lines(tmp_path / "gate_control.txt", [p.replace("dog", "horse") for p in CONCEPT_CONTROL])
    out = tmp_path / "conditional"
    assert run_cli("fit", "--model", sd_dir, "--prompt-set", prompts["dir"], "--method", "mean_shift", "--steer",
                   "text_encoder", "--gate-source", gate_source, "--gate-control", gate_control, "--pca-rank", 3,
                   "--threshold", "0.5", "--out", out, "--no-progress") == 0
    examples = config_of(out)["num_examples"]
    assert examples["gate_source"] == len(CONCEPT_SOURCE) and examples["gate_control"] == len(CONCEPT_CONTROL)
