"""The gates on held-out texts: the concept (banana) gets high lambdas, its absence low ones."""

from __future__ import annotations

import pytest

from dsas_diffusion.llm import attach
from tests.llm.tiny_lms import HELD_OUT_CONTROL, HELD_OUT_SOURCE, right_padded

# The paper keeps a layer only if its gate reaches 0.75 held-out accuracy; these random tiny
# models reach 0.78-1.0 on the 16 + 16 held-out texts, so the bar is the paper's own.
MIN_ACCURACY = 0.75
MIN_GAP = 0.3  # mean lambda with the concept minus without


def _lambdas(model, tokenizer, steering, layer, texts, gating):
    enc = right_padded(tokenizer, texts)
    # only this layer hooked: its gate reads the model's own activations, not ones steered upstream
    with attach(steering, model, layers=[layer], gating=gating) as handle:
        model(**enc)
    last = enc["attention_mask"].sum(1) - 1
    return handle.scales[layer][range(len(texts)), last]


@pytest.mark.parametrize("gating", ["sequence", "causal"])
def test_held_out_texts_with_the_concept_are_steered_and_without_it_are_not(model, tokenizer, steering, gating):
    """`sequence` (and `causal` at the last token) read exactly what the gate was trained on: the
    mean over a text's real tokens."""
    for layer in steering.steered_layers:
        on = _lambdas(model, tokenizer, steering, layer, HELD_OUT_SOURCE, gating)
        off = _lambdas(model, tokenizer, steering, layer, HELD_OUT_CONTROL, gating)
        accuracy = ((on > 0.5).float().mean() + (off < 0.5).float().mean()).item() / 2
        assert accuracy >= MIN_ACCURACY, (layer, on, off)
        assert on.mean() - off.mean() >= MIN_GAP, (layer, on, off)


def test_the_first_token_and_left_padding_are_never_steered(model, tokenizer, steering):
    enc = tokenizer(HELD_OUT_SOURCE[:2] + ["i see a banana"], padding=True, padding_side="left", return_tensors="pt")
    with attach(steering, model) as handle:
        model(**enc)
    first = enc["attention_mask"].argmax(1)
    for lam in handle.scales.values():
        assert not lam[range(3), first].any()
        assert not lam[~enc["attention_mask"].bool()].any()
