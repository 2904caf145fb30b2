"""Every runnable module parses its arguments before doing any work (`--help` prints help and exits
0 at once; `python -m dsas_diffusion.toy.lm_eval --help` used to run a whole evaluation first),
and the tokenizer builder writes the shipped files byte for byte."""

import re
import runpy
import signal
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULES = ["dsas_diffusion", "dsas_diffusion.toy.lm_eval", "dsas_diffusion.toy.train_lm",
           "dsas_diffusion.toy.train_t2i", "dsas_diffusion.toy.train_dit", "benchmarks.overhead", "benchmarks.oracle",
           "benchmarks.toy_worlds", "benchmarks.fused_check", "benchmarks.act_options", "benchmarks.gate_sweep",
           "benchmarks.toy_learned_t2i", "benchmarks.toy_lm_defaults", "benchmarks.real_lm", "benchmarks.real_lm.defaults",
           "benchmarks.compiled_step", "benchmarks.graph_counts"]
SCRIPTS = ["assets/build_tiny_clip_tokenizer.py", "assets/build_tiny_t5_tokenizer.py"]
SECONDS = 30  # parsing takes milliseconds; any real work (training, a sweep) takes minutes


def runnable_files() -> set[str]:
    found = set()
    for folder in ("dsas_diffusion", "benchmarks", "assets"):
        for path in (REPO / folder).rglob("*.py"):
            if re.search(r"^if __name__ == .__main__.:", path.read_text(encoding="utf-8"), re.M):
                found.add(path.relative_to(REPO).as_posix())
    return found


def test_every_runnable_module_is_checked_here():
    named = {m.replace(".", "/") + ("/__main__.py" if (REPO / m.replace(".", "/")).is_dir() else ".py")
             for m in MODULES}  # a package runs its __main__
    assert runnable_files() == named | set(SCRIPTS)


class TookTooLong(Exception):
    pass


def run_help(run, monkeypatch, capsys, name: str) -> str:
    """Run `name --help` in this process, as `python -m name --help` does; fail (not hang) past SECONDS."""
    def alarm(*_):
        raise TookTooLong(f"{name} --help ran for more than {SECONDS} s: it works before parsing its arguments")

    monkeypatch.setattr(sys, "argv", [name, "--help"])
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(SECONDS)
    try:
        with pytest.raises(SystemExit) as e:
            run()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage:"), out[-2000:]
    return out


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # runpy: the module was imported before, by its package
@pytest.mark.parametrize("module", MODULES)
def test_help_exits_before_any_work(module, monkeypatch, capsys):
    run_help(lambda: runpy.run_module(module, run_name="__main__", alter_sys=True), monkeypatch, capsys, module)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help_exits_before_any_work(script, monkeypatch, capsys):
    run_help(lambda: runpy.run_path(str(REPO / script), run_name="__main__"), monkeypatch, capsys, script)


def test_tokenizer_builder_writes_the_shipped_files(tmp_path):
    build = runpy.run_path(str(REPO / "assets" / "build_tiny_clip_tokenizer.py"))["build"]
    shipped = REPO / "assets" / "tiny-clip-tokenizer"
    for attempt in ("first", "second"):  # the `tokenizers` trainer gave another merge order on each run
        out = tmp_path / attempt
        build(out)
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            assert (out / name).read_bytes() == (shipped / name).read_bytes(), name


def test_tokenizer_builder_tokenizes_every_word_as_one_token():
    from transformers import CLIPTokenizer

    words = runpy.run_path(str(REPO / "assets" / "build_tiny_clip_tokenizer.py"))["WORDS"]
    tok = CLIPTokenizer.from_pretrained(REPO / "assets" / "tiny-clip-tokenizer")
    assert all(len(tok.tokenize(w)) == 1 for w in words)
