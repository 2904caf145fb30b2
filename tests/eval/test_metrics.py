"""Concept rate, drift, Pareto fronts: closed-form answers on hand-made inputs."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from dsas_diffusion.eval import (check_concept_texts, concept_probabilities, concept_rate, embedding_drift,
                                 pareto_mask, pareto_table, pixel_drift, plot_pareto)
from dsas_diffusion.eval.pareto import place_labels


def test_concept_probability_and_rate():
    e = torch.eye(3)
    p = concept_probabilities(e, e[:1], e[1:], logit_scale=100.0)  # image i is text i
    assert p[0] > 0.99 and p[1] < 0.01 and p[2] < 0.01
    assert concept_rate(p) == pytest.approx(1 / 3)
    assert math.isnan(concept_rate([]))
    assert concept_rate([True, False, False, True]) == 0.5  # decisions taken already: no threshold
    assert concept_rate(torch.tensor([True, True, False]), threshold=1.0) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="anti-concept texts are empty"):
        check_concept_texts(["a banana"], [])
    with pytest.raises(ValueError, match="both a concept and an anti-concept"):
        check_concept_texts(["a banana"], ["a banana"])


def test_summary_concept_rate_is_the_concept_rate_of_the_scores():
    from dsas_diffusion.cli.scoring import summarize

    flags = [True, False, True, None, False, False, True]
    scores = [{"variant": "dsas-a1", "group": "concept", "clip_score": 20.0, "is_concept": f} for f in flags]
    scores.append({"variant": "unsteered", "group": "concept", "clip_score": 20.0, "is_concept": None})
    rows = summarize(scores)
    assert rows[0]["n"] == 7 and rows[0]["concept_rate"] == round(concept_rate([f for f in flags if f is not None]), 6)
    assert rows[1]["concept_rate"] is None  # no concept texts: no rate


def test_drift():
    a = Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8))
    b = Image.fromarray(np.full((4, 4, 3), 51, dtype=np.uint8))
    assert pixel_drift(a, a) == 0 and pixel_drift(a, b) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="same height and width"):
        pixel_drift(a, a.resize((8, 8)))
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), dim=-1)
    assert torch.allclose(embedding_drift(e, e), torch.zeros(2), atol=1e-6)
    assert embedding_drift(e[:1], e[1:])[0] == pytest.approx(1 - 1 / math.sqrt(2))


POINTS = [
    {"mode": "unsteered", "alpha": 0.0, "x": 0.0, "y": 0.9},
    {"mode": "plain", "alpha": 1.0, "x": 0.5, "y": 0.2},
    {"mode": "plain", "alpha": 2.0, "x": 0.8, "y": 0.2},   # dominated by plain 1
    {"mode": "dsas", "alpha": 1.0, "x": 0.1, "y": 0.3},
    {"mode": "dsas", "alpha": 2.0, "x": 0.2, "y": 0.1},
    {"mode": "dsas", "alpha": 4.0, "x": float("nan"), "y": 0.0},
]


def test_pareto_mask():
    assert pareto_mask(POINTS, "x", "y") == [True, False, False, True, True, False]


def test_pareto_table_and_plot(tmp_path):
    table = pareto_table(POINTS[:2], [("mode", "method"), ("x", "|drift|")])
    assert table == "| method | \\|drift\\| |\n|---|---|\n| unsteered | 0 |\n| plain | 0.5 |\n"
    pytest.importorskip("matplotlib")
    plot_pareto(POINTS, tmp_path / "front.png", x="x", y="y", xlabel="drift", ylabel="concept rate")
    assert (tmp_path / "front.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["front.png"]  # no temporary left


def test_crowded_labels_overlap_neither_each_other_nor_the_markers():
    """Points of two methods crowded at the origin, as on a toy front: each label finds a free place, labels
    of coinciding points of one method are merged, and labels pushed away are tied to their point."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 3), dpi=100)
    ax = fig.add_subplot()
    # about 3.5 px per 0.01 on x: distinct points 4 px apart, labels 7 px wide
    crowded = {"tab:blue": [(0.0, 0.0), (0.012, 0.0), (0.024, 0.0), (0.036, 0.01), (0.5, 1.0)],
               "tab:orange": [(0.006, 0.0), (0.018, 0.0), (0.018, 0.0), (0.03, 0.01), (1.0, 0.0)]}
    items = []
    for colour, pts in crowded.items():
        ax.plot(*zip(*pts), "o-", color=colour)
        items += [(x, y, f"{i + 1:g}", colour) for i, (x, y) in enumerate(pts)]
    annotations = place_labels(ax, items)
    from matplotlib.text import Text

    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(a, renderer) for a in annotations]  # the text, without its leader line
    assert len(annotations) == 9 and "2, 3" in [a.get_text() for a in annotations]  # orange 2 and 3 coincide
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    markers = ax.transData.transform([p for pts in crowded.values() for p in pts])
    r = 3 * fig.dpi / 72  # the default marker's radius
    assert not any(b.x0 < x + r and x - r < b.x1 and b.y0 < y + r and y - r < b.y1 for b in boxes for x, y in markers)
    assert any(a.arrow_patch is not None for a in annotations)  # crowded: some labels had to move away
