"""fit_steering: what it records, how it pools, and how it refuses bad input before the model runs."""

from __future__ import annotations

import pytest
import torch

from dsas_diffusion import Steering
from dsas_diffusion.llm import fit_steering
from dsas_diffusion.llm.fitting import collect_activations
from dsas_diffusion.llm.targets import resolve_layers
from tests.llm.tiny_lms import (CONTEXT, CONTROL, PAD, SOURCE, TARGET, TINY_FIT, fitted, make_model, make_tokenizer,
                                right_padded)


def test_fit_records_the_model_and_its_own_layer_names(family, model):
    steering = fitted(family)
    assert isinstance(steering, Steering)
    pattern, names = resolve_layers(model)
    assert steering.layers == names  # the model's own module names, no prefix
    assert steering.config.targets == {"": pattern}
    assert set(steering.config.fingerprint) == {""}
    assert steering.config.method == "mean_shift"
    assert steering.config.num_examples == {"source": 24, "target": 24, "control": 24}
    assert steering.steered_layers
    steering.check_model(model)  # the same weights pass


def test_pooled_activations_exclude_padding_and_ignore_the_batch(tokenizer):
    """Mean over each text's real tokens but the first (never steered), and the same whether a text is run alone
    or in a padded batch."""
    model = make_model("llama")
    _, names = resolve_layers(model)
    texts = ["i see a banana", "i see a red dog on the big table near the sea"]
    ids = tokenizer(texts)["input_ids"]
    batched = collect_activations(model, ids, PAD, names, batch_size=2, progress=False)
    alone = collect_activations(model, ids, PAD, names, batch_size=1, progress=False)
    enc = right_padded(tokenizer, texts[:1])
    hidden = model(**enc, output_hidden_states=True).hidden_states[1]  # output of model.layers.0
    for name in names:
        torch.testing.assert_close(batched[name], alone[name], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[names[0]][0], hidden[0][1:].mean(0), rtol=1e-5, atol=1e-5)


def test_fitting_turns_dropout_off_and_restores_every_flag():
    model = make_model("gpt2").train()  # GPT-2's dropout is 0.1: it would make the activations random
    model.transformer.h[0].eval()
    flags = [m.training for m in model.modules()]
    steering = _fit(model=model)
    assert [m.training for m in model.modules()] == flags
    reference = fitted("gpt2")
    for name in reference.layers:
        torch.testing.assert_close(steering.maps[name].shift, reference.maps[name].shift)


def _fit(**kwargs):
    args = dict(model=make_model("gpt2"), tokenizer=make_tokenizer(), source=SOURCE, target=TARGET, control=CONTROL,
                **TINY_FIT)
    args.update(kwargs)
    return fit_steering(**args)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(source=[]), ValueError, "source set is empty"),
    (dict(control=[]), ValueError, "control set is empty"),
    (dict(target="a banana"), TypeError, "target must be a list"),
    (dict(control=SOURCE), ValueError, "only one class.*control must be examples WITHOUT the concept"),
    (dict(source=SOURCE[:1]), ValueError, "source set has 1 example.*at least 2"),
    (dict(source=["i see a banana " * 20] + SOURCE), ValueError,
     rf"source text has 81 tokens but the model's context holds {CONTEXT} \(config\.max_position_embeddings\).*shorten it"),
    (dict(tokenizer=make_tokenizer(pad=False)), ValueError, r"no pad token.*tokenizer.pad_token = tokenizer.eos_token"),
    (dict(layers=r"model\.layers\.\d+"), ValueError, "no module of the model .*matches the layer pattern"),
    (dict(layers="post_feedforward_layernorm"), ValueError, "no module of the model"),
    (dict(method="steer_harder"), ValueError, "method='steer_harder' is unknown; choose one of"),
    (dict(pca_rank=0), ValueError, "pca_rank must be a positive integer"),
    (dict(pca_rank=64), ValueError, "pca_rank=64 needs at least 64 source \\+ control examples"),
    (dict(gatting="token"), TypeError, r"unknown option\(s\) \['gatting'\].*'gating'"),
    (dict(fingerprint={}), TypeError, r"unknown option\(s\) \['fingerprint'\]"),
    (dict(batch_size=0), ValueError, "batch_size must be a positive integer, got 0"),
    (dict(model="gpt2"), TypeError, "model must be a transformers model"),
    (dict(tokenizer=make_model("gpt2")), TypeError, "tokenizer must be a transformers tokenizer"),
])
def test_bad_input_is_refused_with_the_fix(kwargs, error, match):
    with pytest.raises(error, match=match):
        _fit(**kwargs)


def test_bad_input_is_refused_before_the_model_runs():
    model = make_model("gpt2")
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError):
        _fit(model=model, source=["i see a banana " * 20] + SOURCE)
    assert not calls


def test_a_huge_first_token_does_not_reach_the_fit():
    """An attention sink (SmolLM2's first token is ~140x the others' norm) at the fitted layer leaves the fitted
    maps and gates as they are: fitting reads only the positions run time steers."""
    def fit(sink: float):
        model = make_model("llama")
        last = model.model.layers[-1]  # its output reaches no other position: only the sink changes
        last.register_forward_hook(lambda m, args, out: _with_first_token(out, sink))
        return _fit(model=model, layers=r"model\.layers\.1", accuracy_threshold=0.0)

    plain, sink = fit(0.0), fit(2.4e4)
    for name in plain.layers:  # exactly: the sink is multiplied by 0, never averaged in
        assert torch.equal(plain.gates[name].weight, sink.gates[name].weight)
        assert torch.equal(plain.gates[name].bias, sink.gates[name].bias)
        assert torch.equal(plain.maps[name].shift, sink.maps[name].shift)


def _with_first_token(out, sink: float):
    x = (out[0] if isinstance(out, tuple) else out).clone()
    x[:, 0, 0] += sink
    return (x, *out[1:]) if isinstance(out, tuple) else x
