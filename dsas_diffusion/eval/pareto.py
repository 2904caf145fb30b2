"""Pareto fronts over the steering strength alpha: which (method, alpha) points are not beaten on
both objectives at once, as a mask, a markdown table and a PNG plot.

Both objectives are minimised (for instance: the concept rate on concept prompts, and the drift of
control images). matplotlib is imported only when a plot is drawn (`pip install "dsas-diffusion[plot]"`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from ..core.io import atomic_path


def pareto_mask(points: Sequence[dict], x: str, y: str) -> list[bool]:
    """True for each point no other point dominates (<= on both objectives, < on one); NaN never is."""
    def ok(p):
        return _finite(p.get(x)) and _finite(p.get(y))

    mask = []
    for p in points:
        if not ok(p):
            mask.append(False)
            continue
        dominated = any(
            ok(q) and q[x] <= p[x] and q[y] <= p[y] and (q[x] < p[x] or q[y] < p[y]) for q in points
        )
        mask.append(not dominated)
    return mask


def pareto_table(points: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """A markdown table; `columns` are (key, header) pairs. Floats are printed with 4 digits."""
    lines = ["| " + " | ".join(_escape(h) for _, h in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for p in points:
        lines.append("| " + " | ".join(_escape(_cell(p.get(k))) for k, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def plot_pareto(points: Sequence[dict], path: str | os.PathLike, *, x: str, y: str, xlabel: str, ylabel: str,
                title: str = "", group: str = "mode", label: str = "alpha", baseline: str | None = "unsteered") -> None:
    """One line per `group` (points sorted by `label`), each point annotated with its `label`;
    the `baseline` group (a single point) is drawn as a star where every line starts; Pareto-optimal
    points are ringed. Written atomically as a PNG."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"plots need matplotlib ({e}); install it with "
                          '`pip install "dsas-diffusion[plot]"`') from None
    mask = pareto_mask(points, x, y)
    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    ax = fig.add_subplot()
    groups: dict[str, list[dict]] = {}
    for p in points:
        if _finite(p.get(x)) and _finite(p.get(y)):
            groups.setdefault(str(p.get(group)), []).append(p)
    start = groups.pop(baseline, [])[:1] if baseline is not None else []
    for name, pts in groups.items():
        pts = sorted(pts, key=lambda p: p.get(label) or 0)
        ax.plot([p[x] for p in start + pts], [p[y] for p in start + pts], marker="o", label=name)
        for p in pts:
            ax.annotate(_cell(p.get(label)), (p[x], p[y]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if start:
        ax.scatter([start[0][x]], [start[0][y]], marker="*", s=180, color="black", zorder=3, label=baseline)
    front = [p for p, m in zip(points, mask) if m]
    if front:
        ax.scatter([p[x] for p in front], [p[y] for p in front], s=160, facecolors="none", edgecolors="black",
                   label="Pareto front")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
