"""A model loaded from a GGUF file (llama.cpp's format, as real small models ship in wheels) is an ordinary
input: fitting, the fingerprint, save / load of the steering and `attach` all work on it, and strength 0 is
the unsteered model bit for bit. The file is a tiny random Llama written at test time (gguf_files.py)."""

from __future__ import annotations

import pytest
import torch

from dsas_diffusion import Steering
from dsas_diffusion.llm import attach, fit_steering
from tests.llm.tiny_lms import (CONTROL, PROMPTS, SOURCE, TARGET, TINY_FIT, generate, make_model, make_tokenizer,
                                right_padded)

pytest.importorskip("gguf", reason="writing and loading GGUF files needs the `gguf` package: pip install 'gguf>=0.10'")
from tests.llm.gguf_files import write_llama_gguf  # noqa: E402


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    source = make_model("llama")
    return {q: write_llama_gguf(source, folder / f"tiny-llama-{q}.gguf", q) for q in ("F32", "Q4_1")}


@pytest.fixture(scope="module")
def steering(files):
    """Fitted on the 4-bit file, as a user of a quantized checkpoint would (options: see tiny_lms.TINY_FIT)."""
    return fit_steering(load(files["Q4_1"]), make_tokenizer(), SOURCE, TARGET, CONTROL, **TINY_FIT)


def test_the_written_file_loads_as_the_model_it_was_written_from(files):
    """The fixture's own oracle: llama.cpp names, rotary permutation and hyper-parameters all read back."""
    tokenizer, source = make_tokenizer(), make_model("llama")
    loaded = load(files["F32"])
    assert type(loaded).__name__ == "LlamaForCausalLM" and loaded.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(loaded(**right_padded(tokenizer, PROMPTS)).logits,
                           source(**right_padded(tokenizer, PROMPTS)).logits)


def test_a_steering_fitted_on_a_gguf_model_steers_it_and_strength_0_is_the_model(files, steering):
    model, tokenizer = load(files["Q4_1"]), make_tokenizer()
    assert steering.layers == [f"model.layers.{i}" for i in range(2)]  # the default preset found on it
    plain = generate(model, tokenizer, PROMPTS)
    with attach(steering, model, strength=0.0):
        off = generate(model, tokenizer, PROMPTS)
    with attach(steering, model, strength=4.0) as handle:
        on = generate(model, tokenizer, PROMPTS)
        assert set(handle.scales) == set(steering.layers)
    assert torch.equal(off[0], plain[0]) and torch.equal(off[1], plain[1])
    assert not torch.equal(on[1], plain[1])
    assert torch.equal(generate(model, tokenizer, PROMPTS)[1], plain[1])  # detached: the model as it was


def test_a_saved_steering_is_accepted_by_a_fresh_load_of_the_file_and_generates_the_same(files, steering, tmp_path):
    tokenizer, model = make_tokenizer(), load(files["Q4_1"])
    with attach(steering, model, strength=4.0) as handle:
        expected, expected_scales = generate(model, tokenizer, PROMPTS), handle.scales
    steering.save_pretrained(tmp_path)
    loaded = Steering.from_pretrained(tmp_path)
    fresh = load(files["Q4_1"])
    with attach(loaded, fresh, strength=4.0) as handle:  # the fingerprint check runs here
        got = generate(fresh, tokenizer, PROMPTS)
        assert all(torch.equal(handle.scales[k], v) for k, v in expected_scales.items())
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_a_steering_of_the_4_bit_file_is_refused_on_the_float_weights_it_was_quantized_from(files, steering):
    """4-bit blocks move weights by far more than a dtype cast: to the fingerprint another checkpoint."""
    with pytest.raises(ValueError, match="fitted on a model with other weights.*fit the steering again"):
        attach(steering, load(files["F32"]))
