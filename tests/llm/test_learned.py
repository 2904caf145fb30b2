"""LinEAS, end-to-end gates and conditional steering through `llm.fit_steering` on a tiny LM: the
learned maps lower the Wasserstein loss, a conditional steering's gate fires on its own concept
only, and every new kind of steering keeps the oracles (strength 0 bit-identical, save / load)."""

from __future__ import annotations

import pytest
import torch

from dsas_diffusion import Steering
from dsas_diffusion.core.learned import wasserstein
from dsas_diffusion.llm import attach, fit_steering
from dsas_diffusion.llm.fitting import collect_activations
from tests.llm.tiny_lms import (_PAIRS, CONTROL, PAD, PROMPTS, SOURCE, TARGET, THINGS, TINY_FIT, make_model,
                                make_tokenizer, right_padded, sentences)

FAMILY = "llama"
QUICK = {"steps": 30, "lr": 1e-2}
# a conditional steering: the map banana -> apple, the gate "a dog is in the text"
GATE_SOURCE = sentences("dog", _PAIRS[:24])
OTHERS = [t for t in THINGS if t != "dog"]
GATE_CONTROL = [s.replace("dog", OTHERS[i % len(OTHERS)]) for i, s in enumerate(GATE_SOURCE)]
HELD_OUT_DOG, HELD_OUT_BANANA = sentences("dog", _PAIRS[24:]), sentences("banana", _PAIRS[24:])

KINDS = {
    "lineas": dict(method="lineas", training=QUICK),
    "lineas-e2e-sigmoid": dict(method="lineas", gates="e2e", training=QUICK),
    "mean_shift-e2e-relu": dict(method="mean_shift", gates="e2e", gate_activation="relu", training=QUICK),
    "conditional": dict(method="mean_shift", gate_source=GATE_SOURCE, gate_control=GATE_CONTROL),
}
_FITTED: dict = {}


def fitted(kind: str) -> Steering:
    if kind not in _FITTED:
        _FITTED[kind] = fit_steering(make_model(FAMILY), make_tokenizer(), SOURCE, TARGET, CONTROL,
                                     **{**TINY_FIT, **KINDS[kind]})
    return _FITTED[kind]


def pooled(model, tokenizer, texts, names):
    return collect_activations(model, tokenizer(texts)["input_ids"], PAD, names, 8, progress=False)


@pytest.mark.parametrize("kind", list(KINDS))
def test_strength_zero_is_bit_identical_and_a_saved_steering_steers_the_same(kind, tmp_path):
    steering, model, tokenizer = fitted(kind), make_model(FAMILY), make_tokenizer()
    enc = right_padded(tokenizer, PROMPTS + HELD_OUT_DOG[:2])
    with torch.no_grad():
        baseline = model(**enc).logits
        with attach(steering, model, strength=0.0):
            assert torch.equal(model(**enc).logits, baseline)
        with attach(steering, model, strength=1.0):
            steered = model(**enc).logits
        steering.save_pretrained(tmp_path)
        loaded = Steering.from_pretrained(tmp_path)
        with attach(loaded, model, strength=1.0):
            assert torch.equal(model(**enc).logits, steered)
    assert not torch.equal(steered, baseline)
    assert loaded.config.gates == steering.config.gates and loaded.config.method == steering.config.method
    assert loaded.config.training == steering.config.training
    if kind != "conditional":  # what was learned says how: its options, steps run and last loss
        assert steering.config.training["steps"] == QUICK["steps"] >= steering.config.training["steps_run"]
        assert steering.config.training["final_loss"] >= 0


def test_lineas_lowers_the_wasserstein_loss_between_steered_source_and_target():
    steering, model, tokenizer = fitted("lineas"), make_model(FAMILY), make_tokenizer()
    names = steering.layers
    target, before = pooled(model, tokenizer, TARGET, names), pooled(model, tokenizer, SOURCE, names)
    with attach(steering, model, gated=False):  # plain LinEAS: every layer, lambda = 1
        after = pooled(model, tokenizer, SOURCE, names)
    total = {label: sum(wasserstein(acts[n], target[n]) for n in names) for label, acts in
             (("before", before), ("after", after))}
    assert total["after"] < 0.8 * total["before"], total


def test_e2e_gates_are_recorded_as_learned_and_every_layer_is_steered():
    steering = fitted("mean_shift-e2e-relu")
    assert steering.config.gates == "e2e" and steering.config.gate_activation == "relu"
    assert steering.steered_layers == steering.layers
    assert "gate_source" not in steering.config.num_examples


def test_a_conditional_gate_fires_on_its_own_concept_not_on_the_map_concept():
    steering, model, tokenizer = fitted("conditional"), make_model(FAMILY), make_tokenizer()
    assert steering.config.num_examples["gate_source"] == len(GATE_SOURCE)
    for layer in steering.steered_layers:
        lambdas = {}
        for label, texts in (("dog", HELD_OUT_DOG), ("banana", HELD_OUT_BANANA)):
            enc = right_padded(tokenizer, texts)
            with attach(steering, model, layers=[layer], gating="sequence") as handle, torch.no_grad():
                model(**enc)
            lambdas[label] = handle.scales[layer][:, 1:].mean(1)  # the first token is never steered
        assert lambdas["dog"].mean() > 0.7 and lambdas["banana"].mean() < 0.3, (layer, lambdas)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(training={"steps": 5}), ValueError, r"training options apply to what is learned.*drop training="),
    (dict(gates="learned"), ValueError, r"gates='learned' is unknown; choose one of \['e2e', 'two_stage'\]"),
    (dict(gates="e2e", gate_source=GATE_SOURCE), ValueError, r"end-to-end gates learn from source, target and control"),
    (dict(gate_source=GATE_SOURCE, gate_control=GATE_SOURCE[:3] + GATE_CONTROL[3:]), ValueError,
     r"3 example\(s\) are in both the gate_source and the gate_control set"),
    (dict(gate_source="a dog"), TypeError, r"gate_source must be a list of examples, not one string"),
    (dict(method="lineas", training={"lr": 0}), ValueError, r"lr must be a finite number > 0"),
])
def test_bad_arguments_of_the_new_methods_are_refused_before_the_model_runs(kwargs, error, message):
    model = make_model(FAMILY)
    model.forward = None  # any forward would fail loudly: the checks must come first
    with pytest.raises(error, match=message):
        fit_steering(model, make_tokenizer(), SOURCE, TARGET, CONTROL, progress=False, **kwargs)


def test_learning_leaves_the_model_as_it_was():
    model = make_model(FAMILY)
    model.lm_head.weight.requires_grad_(False)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    fit_steering(model, make_tokenizer(), SOURCE, TARGET, CONTROL, method="lineas", training={"steps": 3}, **TINY_FIT)
    assert all(torch.equal(p, before[n][0]) and p.requires_grad == before[n][1] and p.grad is None
               for n, p in model.named_parameters())
    assert not model.training and all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
