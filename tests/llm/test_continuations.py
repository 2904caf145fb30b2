"""Fitting on the model's own continuations (`continuations=N`), and the gate rows of causal gating."""

from __future__ import annotations

import pytest
import torch

from dsas_diffusion.core import fit_gate
from dsas_diffusion.llm import fit_steering
from dsas_diffusion.llm.fitting import collect_activations, continued, read_positions
from dsas_diffusion.llm.targets import resolve_layers
from tests.llm.tiny_lms import CONTROL, PAD, SOURCE, TARGET, TINY_FIT, make_model, make_tokenizer



def test_each_text_is_followed_by_its_own_greedy_continuation_cut_at_the_end_token():
    model, tokenizer = make_model("llama"), make_tokenizer()
    ids = tokenizer(SOURCE[:3])["input_ids"]
    got = continued(model, ids, PAD, None, 5, batch_size=2, progress=False)
    for prompt, full in zip(ids, got):
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, pad_token_id=PAD)[0]
        assert full == alone.tolist()  # batched with left padding, the same tokens as alone
    stop = got[0][len(ids[0]) + 1]  # make the second new token of the first text its end token
    cut = continued(model, ids[:1], PAD, stop, 5, batch_size=1, progress=False)[0]
    assert cut == got[0][:len(ids[0]) + 1]


def test_continuations_change_the_fit_and_bad_values_are_refused_before_the_model_runs():
    args = dict(tokenizer=make_tokenizer(), source=SOURCE, target=TARGET, control=CONTROL, **TINY_FIT)
    plain = fit_steering(make_model("llama"), **args)
    longer = fit_steering(make_model("llama"), **{**args, "continuations": 4})
    assert plain.layers == longer.layers
    assert not torch.allclose(plain.maps[plain.layers[0]].shift, longer.maps[plain.layers[0]].shift)
    for bad, error in ((-1, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="continuations"):
            fit_steering(make_model("llama"), **{**args, "continuations": bad})


def test_causal_gates_are_fitted_on_the_running_means_run_time_reads():
    """Source texts give the running means from their end on, control texts from their first steered token on,
    each prompt weighing the same: the gate equals fit_gate on exactly those rows."""
    model, tokenizer = make_model("llama"), make_tokenizer()
    steering = fit_steering(model, tokenizer, SOURCE, TARGET, CONTROL, **TINY_FIT)
    _, names = resolve_layers(model)
    name = names[-1]
    ids = {label: tokenizer(texts)["input_ids"] for label, texts in (("source", SOURCE), ("control", CONTROL))}
    at = {"source": read_positions([len(i) for i in ids["source"]], [len(i) - 1 for i in ids["source"]]),
          "control": read_positions([len(i) for i in ids["control"]], [1] * len(ids["control"]))}
    assert all(p == [len(i) - 1] for p, i in zip(at["source"], ids["source"]))
    assert all(p[-1] == len(i) - 1 and p[0] <= 4 for p, i in zip(at["control"], ids["control"]))
    rows = {label: collect_activations(model, ids[label], PAD, [name], 8, progress=False, at=at[label])[name]
            for label in at}
    groups = {label: torch.repeat_interleave(torch.arange(len(at[label])), torch.tensor([len(p) for p in at[label]]))
              for label in at}
    gate = fit_gate(rows["source"], rows["control"], rank=10, source_groups=groups["source"],
                    control_groups=groups["control"])
    torch.testing.assert_close(steering.gates[name].weight, gate.weight)
    assert steering.config.layers[name].gate_accuracy == gate.accuracy
