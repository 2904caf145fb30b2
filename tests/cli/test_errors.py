"""Bad input to the `dsas` command gets one line naming the problem and the fix (exit status 2)."""

import sys

import pytest

from tests.conftest import save_stock_pipeline

from .conftest import GEN, run_cli, write_lines


def error_of(capsys, *args) -> str:
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_missing_prompt_file(steering_dir, tmp_path, capsys):
    err = error_of(capsys, "generate", "--steering", steering_dir, "--prompts", tmp_path / "nope.txt", "--out",
                   tmp_path / "o")
    assert "prompt file" in err and "nope.txt does not exist" in err


def test_empty_prompt_file(sd_dir, prompts, tmp_path, capsys):
    empty = write_lines(tmp_path / "empty.txt", ["", "# only a comment", "   "])
    err = error_of(capsys, "fit", "--model", sd_dir, "--prompt-set", prompts["dir"], "--source", empty,
                   "--out", tmp_path / "s")
    assert "empty.txt holds no prompts" in err and "one prompt per line" in err


def test_unknown_column(steering_dir, tmp_path, capsys):
    csv = write_lines(tmp_path / "i2p.csv", ["prompt,sd_seed", "a banana,3"])
    err = error_of(capsys, "generate", "--steering", steering_dir, "--prompts", csv, "--column", "text",
                   "--out", tmp_path / "o")
    assert "has no column 'text'; its columns are: prompt, sd_seed. Pass --column" in err


def test_steering_for_another_model(steering_dir, prompts, tmp_path, capsys):
    other = save_stock_pipeline(tmp_path / "other-sd", seed=1)
    err = error_of(capsys, "generate", "--model", other, "--steering", steering_dir, "--prompt", "a banana",
                   "--out", tmp_path / "o", *GEN)
    assert "fitted on a text_encoder with other weights" in err and "fit the steering again on this model" in err


def test_missing_steering_folder_and_model(sd_dir, prompts, tmp_path, capsys):
    err = error_of(capsys, "generate", "--steering", tmp_path / "nope", "--prompt", "a banana", "--out", tmp_path)
    assert "steering folder" in err and "does not exist; create it with `dsas fit" in err
    err = error_of(capsys, "fit", "--model", tmp_path / "no-model", "--prompt-set", prompts["dir"], "--out", tmp_path)
    assert "no-model does not exist" in err
    err = error_of(capsys, "fit", "--model", prompts["dir"], "--prompt-set", prompts["dir"], "--out", tmp_path)
    assert "is not a diffusers pipeline folder (no model_index.json)" in err


def test_fit_refuses_to_replace_a_steering(sd_dir, prompts, steering_dir, capsys):
    err = error_of(capsys, "fit", "--model", sd_dir, "--prompt-set", prompts["dir"], "--out", steering_dir)
    assert "already holds a steering; pass --overwrite" in err


def test_fit_needs_three_prompt_sets(sd_dir, prompts, tmp_path, capsys):
    err = error_of(capsys, "fit", "--model", sd_dir, "--source", prompts["source"], "--target", prompts["target"],
                   "--out", tmp_path / "s")
    assert "no control prompts; pass --control FILE or --prompt-set DIR" in err


def test_eval_of_a_folder_without_results(tmp_path, clip_dir, capsys):
    err = error_of(capsys, "eval", tmp_path, "--clip-model", clip_dir)
    assert "holds no results.jsonl" in err
    (tmp_path / "results.part-0.jsonl").write_text("")
    assert "has not finished" in error_of(capsys, "eval", tmp_path, "--clip-model", clip_dir)


def test_concept_texts_on_one_side_only(tmp_path, capsys):
    err = error_of(capsys, "eval", tmp_path, "--concept", "a banana")
    assert "also pass --anti-concept TEXT" in err


def test_sweep_needs_control_prompts_and_concept_texts(steering_dir, prompts, tmp_path, capsys):
    err = error_of(capsys, "sweep", "--steering", steering_dir, "--prompts", prompts["heldout_source"],
                   "--out", tmp_path)
    assert "pass --concept TEXT and --anti-concept TEXT" in err
    err = error_of(capsys, "sweep", "--steering", steering_dir, "--prompts", prompts["heldout_source"],
                   "--concept", "a banana", "--anti-concept", "an apple", "--out", tmp_path, *GEN)
    assert "needs concept and control prompts; also pass --control-prompts" in err


def test_open_clip_missing(tmp_path, monkeypatch, capsys):
    (tmp_path / "results.jsonl").write_text('{"key": "a", "image": "a.png", "prompt": "a banana"}\n')
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if open-clip-torch were not installed
    err = error_of(capsys, "eval", tmp_path, "--clip-backend", "open_clip")
    assert 'pip install "dsas-diffusion[openclip]"' in err


def test_bad_seeds_are_an_argument_error(steering_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli("generate", "--steering", steering_dir, "--prompt", "a", "--seeds", "one", "--out", tmp_path)
    assert e.value.code == 2
    assert "write '0,1,2' or '0-3'" in capsys.readouterr().err


def test_sweep_without_matplotlib_still_writes_the_numbers(tmp_path, monkeypatch, capsys):
    from dsas_diffusion.cli.sweep import write_pareto

    rows = [{"variant": v, "mode": m, "alpha": a, "group": g, "concept_rate": 0.5, "drift_clip": 0.1, "clip_score": 20}
            for v, m, a in (("unsteered", "unsteered", 0.0), ("dsas-a1", "dsas", 1.0)) for g in ("concept", "control")]
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    write_pareto(tmp_path, rows, drift="clip", concept_metric="rate", settings={})
    assert (tmp_path / "pareto.json").is_file() and (tmp_path / "pareto.md").is_file()
    assert not (tmp_path / "pareto.png").exists()
    assert 'pip install "dsas-diffusion[plot]"' in capsys.readouterr().err


def test_model_and_steering_paths_with_a_tilde(steering_dir, tmp_path, monkeypatch):
    from dsas_diffusion.cli.common import CLIError, check_model_path, load_steering, local_path

    monkeypatch.setenv("HOME", str(tmp_path))  # `--model=~/sd`: the shell expands no `~` after an `=`
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text("{}")
    assert check_model_path("~/sd") == str(tmp_path / "sd")
    assert check_model_path("org/model") == "org/model" and local_path("org/model") is None  # a hub id
    with pytest.raises(CLIError, match="model folder ~/nope does not exist"):
        check_model_path("~/nope")
    (tmp_path / "steer").symlink_to(steering_dir, target_is_directory=True)
    assert load_steering("~/steer").config.method == "mean_shift"
    with pytest.raises(CLIError, match="steering folder ~/gone does not exist"):
        load_steering("~/gone")
