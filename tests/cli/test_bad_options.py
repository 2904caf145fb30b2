"""A bad option value is an argument error before anything is loaded: `dsas CMD: error: argument
--OPTION: ...` on stderr, exit status 2, no traceback. Damaged models and steerings fitted on a
folder that is gone get one clear line too."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import save_stock_pipeline

from .conftest import GEN, run_cli

FIT = ["fit", "--model", "no-model", "--prompt-set", "no-prompts", "--out", "steering"]
GENERATE = ["generate", "--steering", "no-steering", "--prompt", "a banana", "--out", "run"]
SWEEP = ["sweep", "--steering", "no-steering", "--prompt", "a banana", "--out", "run"]
EVAL = ["eval", "no-run"]
FILE = "<a file>"  # replaced by the path of an existing file

CASES = [
    # (command, option, value, words the message must hold besides the option name)
    (FIT, "--steps", "0", "at least 1, got 0"),  # was a ZeroDivisionError traceback
    (FIT, "--steps", "-1", "at least 1, got -1"),
    (FIT, "--steps", "ten", "'ten' is not a whole number"),
    (FIT, "--batch-size", "0", "at least 1, got 0"),
    (FIT, "--pca-rank", "0", "at least 1, got 0"),
    (FIT, "--threshold", "1.5", "not between 0 and 1"),
    (FIT, "--threshold", "nan", "'nan' is not a finite number"),
    (FIT, "--guidance", "nan", "'nan' is not a finite number"),
    (FIT, "--height", "500", "500 pixels is not a multiple of 8"),
    (FIT, "--width", "0", "0 pixels is not a multiple of 8"),
    (FIT, "--seed", "-1", "seed -1 is out of range"),
    (FIT, "--seed", str(2**32), f"seed {2**32} is out of range"),
    (FIT, "--unet-layers", "attn2(", "is not a regular expression"),
    (FIT, "--text-encoder-layers", "[", "is not a regular expression"),
    (FIT, "--out", FILE, "is a file, not a folder"),
    (FIT, "--report", ".", "is a folder; pass a file name"),
    (FIT, "--threads", "0", "at least 1, got 0"),
    (GENERATE, "--steps", "0", "at least 1, got 0"),
    (GENERATE, "--steps", "-1", "at least 1, got -1"),  # exited 0 and saved noise
    (GENERATE, "--seeds", "0-10000000000", "seed 10000000000 is out of range"),  # was a MemoryError
    (GENERATE, "--seeds", "0-20000", "gives 20001 seeds; one run takes at most 10000"),
    (GENERATE, "--seeds", "5-1", "runs backwards"),
    (GENERATE, "--seeds", ",", "no seeds given"),
    (GENERATE, "--alpha", "nan", "'nan' is not a finite number"),
    (GENERATE, "--alpha", "-inf", "'-inf' is not a finite number"),
    (GENERATE, "--alpha", "1e30", "must be at most 1000"),
    (GENERATE, "--alpha", "strong", "'strong' is not a number"),
    (GENERATE, "--guidance", "nan", "'nan' is not a finite number"),
    (GENERATE, "--guidance", "-2", "out of range"),
    (GENERATE, "--guidance", "1e9", "out of range"),
    (GENERATE, "--height", "12", "12 pixels is not a multiple of 8"),
    (GENERATE, "--width", "100000", "100000 pixels is not a multiple of 8 between 8 and 8192"),
    (GENERATE, "--out", FILE, "is a file, not a folder"),
    (GENERATE, "--out", FILE + "/run", "which is a file"),
    (GENERATE, "--out", "", "empty path"),
    (SWEEP, "--alphas", "0,1", "0 is not > 0"),
    (SWEEP, "--alphas", "1,nan", "'nan' is not a finite number"),
    (SWEEP, "--alphas", "1,-2", "-2 is not > 0"),
    (SWEEP, "--alphas", ",", "the list is empty"),
    (SWEEP, "--concept-threshold", "0", "not strictly between 0 and 1"),
    (SWEEP, "--clip-batch-size", "0", "at least 1, got 0"),
    (SWEEP, "--steps", "-3", "at least 1, got -3"),
    (EVAL, "--concept-threshold", "1", "not strictly between 0 and 1"),
    (EVAL, "--concept-threshold", "inf", "'inf' is not a finite number"),
    (EVAL, "--clip-batch-size", "-1", "at least 1, got -1"),
    (EVAL, "--out", FILE, "is a file, not a folder"),
    (EVAL, "--threads", "5000", "more than any CPU has"),
]


@pytest.mark.parametrize("command, option, value, words", CASES,
                         ids=[f"{c[0]}{o}={v}" for c, o, v, _ in CASES])
def test_bad_option_is_an_argument_error(command, option, value, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a folder\n")
    value = value.replace(FILE, str(tmp_path / "a-file"))
    with pytest.raises(SystemExit) as e:
        run_cli(*command, f"{option}={value}")  # '=': argparse reads a lone '-inf' as an option
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert f"dsas {command[0]}: error: argument {option}: " in err and words in err
    assert "Traceback" not in err


def test_more_steps_than_the_scheduler_knows(steering_dir, tmp_path, capsys):
    code = run_cli("generate", "--steering", steering_dir, "--prompt", "a banana", "--out", tmp_path / "run",
                   "--steps", 1001, "--no-progress")
    err = capsys.readouterr().err
    assert code == 2 and "--steps 1001 is more than the 1000 timesteps" in err and "Traceback" not in err


class NotATensor:
    """Pickled into a weights file, it is refused by torch.load(weights_only=True), as any code would be."""


@pytest.mark.parametrize("component, weights", [("text_encoder", "pytorch_model.bin"),
                                                ("unet", "diffusion_pytorch_model.bin")])
def test_pickled_weights_are_refused_with_a_message(prompts, tmp_path, capsys, component, weights):
    model = save_stock_pipeline(tmp_path / "sd")
    for f in (model / component).glob("*.safetensors"):
        f.unlink()
    torch.save({"weight": NotATensor()}, model / component / weights)
    code = run_cli("fit", "--model", model, "--prompt-set", prompts["dir"], "--out", tmp_path / "s", "--no-progress")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"could not load the model {model}: torch refused to unpickle its weights ({component}/{weights})" in err
    assert "saved as safetensors" in err and not (tmp_path / "s").exists()


def test_generate_without_model_says_which_model_it_loads(steering_dir, sd_dir, prompts, tmp_path, capsys):
    assert run_cli("generate", "--steering", steering_dir, "--prompt", "a banana", "--out", tmp_path / "run",
                   *GEN) == 0
    out = capsys.readouterr().out
    assert f"model: {sd_dir} (a local folder), the model the steering was fitted on; pass --model" in out
    assert run_cli("generate", "--steering", steering_dir, "--model", sd_dir, "--prompt", "a banana",
                   "--out", tmp_path / "run2", *GEN) == 0
    assert "the model the steering was fitted on" not in capsys.readouterr().out  # named by the user: no note


def test_generate_refuses_a_fitted_on_folder_that_is_gone(sd_dir, prompts, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(sd_dir, "sd")
    assert run_cli("fit", "--model", "sd", "--prompt-set", prompts["dir"], "--steer", "text_encoder",
                   "--method", "mean_shift", "--pca-rank", 10, "--out", "steering", "--no-progress") == 0
    config = json.loads((tmp_path / "steering" / "steering_config.json").read_text())
    assert config["base_model"] == str(tmp_path / "sd")  # a relative --model is recorded as the folder it named
    (tmp_path / "sd").rename(tmp_path / "sd-moved")
    capsys.readouterr()
    assert run_cli("generate", "--steering", "steering", "--prompt", "a banana", "--out", "run", *GEN) == 2
    err = capsys.readouterr().err
    assert (f"the steering steering was fitted on the local folder {tmp_path / 'sd'}, which does not exist here; "
            "pass --model") in err and "Traceback" not in err
    assert run_cli("generate", "--steering", "steering", "--model", "sd-moved", "--prompt", "a banana",
                   "--out", "run", *GEN) == 0


@pytest.mark.parametrize("base_model, words", [
    ("org/sd-model", "model: org/sd-model (a hub id: from the Hugging Face cache, or downloaded)"),
    ("/no/such/folder", "was fitted on the local folder /no/such/folder, which does not exist here"),
    (None, "does not record the model it was fitted on; pass --model"),
])
def test_the_model_a_steering_names(base_model, words, capsys):
    from dsas_diffusion.cli.common import CLIError
    from dsas_diffusion.cli.generation import fitted_model

    steering = SimpleNamespace(config=SimpleNamespace(base_model=base_model))
    if base_model == "org/sd-model":
        assert fitted_model(steering, "s", state=None) == base_model
        assert words in capsys.readouterr().out
    else:
        with pytest.raises(CLIError, match=words):
            fitted_model(steering, "s", state=None)


def test_every_strength_has_a_file_name_of_its_own():
    from dsas_diffusion.cli.generation import Unit, Variant, comparison_path

    assert Variant("dsas", 1.0).name == "dsas-a1" and Variant("plain", 0.25).name == "plain-a0.25"
    assert Variant("dsas", 1.0000001).name != Variant("dsas", 1.0000002).name  # `:g` alone gives 'dsas-a1' twice
    unit = Unit("concept-00003-s7", "concept", 3, "a banana", 7, 7.5)
    assert comparison_path(unit, 2.0).as_posix() == "compare/concept-00003-s7-a2.png"


@pytest.mark.parametrize("processes, threads, expected", [(2, None, 1), (2, 2, 2), (1, 2, 2), (1, None, None)])
def test_a_split_run_fixes_the_thread_count(processes, threads, expected):
    from dsas_diffusion.cli.common import set_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        set_threads(SimpleNamespace(num_processes=processes), threads)
        assert torch.get_num_threads() == (3 if expected is None else expected)
    finally:
        torch.set_num_threads(before)
