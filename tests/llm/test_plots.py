"""Token heatmaps of the lambdas, as HTML and PNG."""

from __future__ import annotations

import pytest
import torch

from dsas_diffusion.llm import attach, token_heatmap_html, token_heatmap_png
from tests.llm.tiny_lms import fitted, generate, make_model, make_tokenizer

LAYERS = {"model.layers.0": torch.tensor([0.0, 0.25, 1.0]), "model.layers.1": torch.tensor([0.0, 0.5, 0.75])}
TOKENS = ["[BOS]", "<b>", "\u0120banana"]


def test_html_has_one_line_per_layer_and_every_token_escaped():
    page = token_heatmap_html(TOKENS, LAYERS, title="banana?")
    assert page.count("model.layers.") == 2 + 2 * 3  # row labels + one hover title per token
    assert "&lt;b&gt;" in page and "<b>" not in page
    assert "> banana<" in page  # byte-level BPE's leading-space marker shown as a space
    assert "lambda=0.250" in page and "rgba(214,39,40,1.000)" in page


def test_html_of_the_mean_over_layers():
    page = token_heatmap_html(TOKENS, LAYERS, mean=True)
    assert "mean over 2 layers" in page and "lambda=0.875" in page and "model.layers.0" not in page


def test_tokens_and_lambdas_must_line_up():
    with pytest.raises(ValueError, match=r"got 4 tokens but 3 lambdas.*pass tokens\[:-1\]"):
        token_heatmap_html(TOKENS + ["x"], LAYERS)
    with pytest.raises(ValueError, match="hold 2 batch rows; pass row="):
        token_heatmap_html(TOKENS, {"l": torch.zeros(2, 3)})
    with pytest.raises(TypeError, match="list of token strings"):
        token_heatmap_html("[BOS] banana", [0.0, 1.0])


def test_png_from_a_generation_is_written_atomically(tmp_path):
    model, tokenizer = make_model("llama"), make_tokenizer()
    with attach(fitted("llama"), model) as handle:
        tokens, _ = generate(model, tokenizer, ["i see a banana", "a tiny cat"], max_new_tokens=3)
    names = tokenizer.convert_ids_to_tokens(tokens[1, :-1].tolist())
    path = token_heatmap_png(names, handle.scales, tmp_path / "plots" / "lambdas.png", row=1)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["lambdas.png"]  # no temporary file left
    token_heatmap_png(names, handle.scales, path, row=1, mean=True)  # overwrites in place
    assert [p.name for p in path.parent.iterdir()] == ["lambdas.png"]
