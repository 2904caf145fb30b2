"""The real-model benchmark (benchmarks/real_lm): its tasks keep the shared interface, and, when the
SmolLM2 wheel is installed, a tiny run of the protocol on the real model keeps the oracle (strength 0
measures exactly the unsteered model) and produces every metric and the report files; when Gemma-3-270M's
chunk wheels are installed and converted, the library's Gemma default layers are found on it and
strength 0 and detach leave it bit for bit as it was."""

import importlib
import importlib.util
import json
import math

import pytest
import torch

from benchmarks.real_lm import protocol, report, toxicity

TASKS = [name for name in ("toxicity", "topic") if importlib.util.find_spec(f"benchmarks.real_lm.{name}")]


@pytest.mark.parametrize("name", TASKS)
def test_task_sets_keep_the_interface(name):
    task = importlib.import_module(f"benchmarks.real_lm.{name}")
    sets = task.sets()
    assert task.NAME == name and sets == task.sets()  # deterministic
    for key, least in (("source", 32), ("target", 32), ("control", 32), ("held_source", 16), ("held_control", 16)):
        assert len(sets[key]) >= least and len(set(sets[key])) == len(sets[key]), key
    everything = [t for texts in sets.values() for t in texts]
    assert len(set(everything)) == len(everything)  # disjoint splits


def test_toxicity_rules():
    assert toxicity.insulting("shut up, you worthless idiot") and toxicity.insulting("What a DUMB idea")
    assert not toxicity.insulting("The train to Hellsinki leaves at noon; pass the class notes.")
    sets = toxicity.sets()
    # the held-out prompts share neither a scene nor a remark with the fitting ones
    held_scenes = {t.split(' "')[0] for t in sets["held_source"] + sets["held_control"]}
    fit_scenes = {t.split(' "')[0] for k in ("source", "target", "control") for t in sets[k]}
    assert not held_scenes & fit_scenes
    picked = protocol.fitting_sets(sets, seed=1)
    assert all(len(v) == 32 for v in picked.values())
    rows = [sets["source"].index(t) for t in picked["source"]]
    assert rows == [sets["control"].index(t) for t in picked["control"]]  # pairs kept together
    assert picked != protocol.fitting_sets(sets, seed=2)


@pytest.fixture(scope="module")
def smollm2():
    from benchmarks import smollm2

    try:
        smollm2.gguf_file()
    except FileNotFoundError:
        pytest.skip(f"SmolLM2-135M-Instruct is not installed: {smollm2.INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip(f"loading the SmolLM2 GGUF file needs the gguf package: {smollm2.INSTALL}")
    torch.manual_seed(0)
    return smollm2.load()


class TinyTask:
    """Sixteen fitting texts per set, two held-out prompts per side and the word rule."""
    NAME = "tiny"
    sets = staticmethod(lambda: {k: v[:2] if k.startswith("held") else v[:16] for k, v in toxicity.sets().items()})
    render = staticmethod(toxicity.render)
    concept = staticmethod(toxicity.insulting)


def test_protocol_smoke_on_smollm2(smollm2, tmp_path, monkeypatch):
    model, tokenizer = smollm2
    # the protocol's plumbing, not the defaults: fitted on the texts alone (the default generates 32 tokens of each)
    monkeypatch.setitem(protocol.SETTINGS, "tiny", (dict(method="mean_shift", continuations=0), ("plain", "dsas")))
    held = protocol.held_out(model, tokenizer, TinyTask, protocol.benign_texts(4), max_new_tokens=3)
    steering = protocol.fit(model, tokenizer, TinyTask, "tiny", seed=0, steps=1)
    base = protocol.measure(model, tokenizer, held)
    off = protocol.measure(model, tokenizer, held, steering, alpha=0.0, gated=False)
    assert off["source_continuations"] == held.base_source and off["control_unchanged"] == 1.0
    assert off["perplexity"] == base["perplexity"] and math.isfinite(base["perplexity"])
    plain = protocol.measure(model, tokenizer, held, steering, alpha=1.0, gated=False)
    rows = [dict(task="tiny", setting="unsteered", mode="unsteered", alpha=0.0, seed=None, **base),
            dict(task="tiny", setting="mean_shift", mode="plain", alpha=1.0, seed=0, **plain)]
    meta = dict(model="SmolLM2", command="test", wall_s=0.0, threads=1, max_new_tokens=3, seeds=[0],
                learned_seeds=[0])
    paths = report.write(rows, meta, tmp_path)
    assert [p.name for p in paths] == ["real_lm.json", "real_lm.md", "real_lm.png"]
    points = json.loads(paths[0].read_text())["points"]
    assert {p["group"] for p in points} == {"unsteered", "mean_shift, plain"}
    heatmap, = report.heatmaps(model, tokenizer, steering, 1.0, {"source": held.source[0]}, tmp_path / "maps", 2)
    assert heatmap.read_bytes().startswith(b"\x89PNG")


@pytest.fixture(scope="module")
def gemma3():
    from benchmarks import gemma3

    try:
        gemma3.chunks()
    except FileNotFoundError:
        pytest.skip(f"Gemma-3-270M is not installed: {gemma3.INSTALL}")
    if not (gemma3.folder() / "config.json").is_file():
        pytest.skip("Gemma-3-270M is installed but not converted yet (about 5 minutes, once): "
                    "python -c 'from benchmarks import gemma3; gemma3.converted()'")
    return gemma3.load()


def test_gemma3_default_layers_and_oracle(gemma3):
    from dsas_diffusion.llm import attach, fit_steering

    model, tokenizer = gemma3
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.dtype == torch.float32
    sets = toxicity.sets()
    steering = fit_steering(model, tokenizer, sets["source"][:8], sets["target"][:8], sets["control"][:8],
                            pca_rank=4, continuations=0, progress=False)
    assert steering.layers == [f"model.layers.{i}.post_feedforward_layernorm" for i in range(18)]
    prompts = sets["held_source"][:1] + sets["held_control"][:1]
    enc = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")

    def logits():
        with torch.no_grad():
            return model(**enc).logits

    plain = logits()
    with attach(steering, model, strength=0.0):
        assert torch.equal(logits(), plain)
    with attach(steering, model, strength=4.0, gated=False):
        assert not torch.equal(logits(), plain)
    assert torch.equal(logits(), plain)  # detached: the model as it was
