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
    """One line per `group` (points sorted by `label`), each point annotated with its `label` where the
    annotation overlaps no other (`place_labels`); the `baseline` group (a single point) is drawn as a
    star where every line starts; Pareto-optimal points are ringed; the legend sits outside the axes.
    Written atomically as a PNG."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"plots need matplotlib ({e}); install it with "
                          '`pip install "dsas-diffusion[plot]"`') from None
    mask = pareto_mask(points, x, y)
    fig = Figure(figsize=(7.6, 4.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    groups: dict[str, list[dict]] = {}
    for p in points:
        if _finite(p.get(x)) and _finite(p.get(y)):
            groups.setdefault(str(p.get(group)), []).append(p)
    start = groups.pop(baseline, [])[:1] if baseline is not None else []
    labels = []
    for name, pts in groups.items():
        pts = sorted(pts, key=lambda p: p.get(label) or 0)
        (line,) = ax.plot([p[x] for p in start + pts], [p[y] for p in start + pts], marker="o", label=name)
        labels += [(p[x], p[y], _cell(p.get(label)), line.get_color()) for p in pts]
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
    ax.margins(0.08)
    fig.legend(loc="outside right upper", title=f"numbers: {label}", fontsize=8, title_fontsize=8)
    place_labels(ax, labels)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def place_labels(ax, items: Sequence[tuple[float, float, str, str]], fontsize: float = 8) -> list:
    """Annotate each (x, y, text, colour) next to its point, at the nearest place where the text overlaps
    no label placed before it, no marker and no line drawn on `ax` (a line rather than a label or a
    marker where nothing is free), inside the axes; labels of one colour whose points coincide on screen are
    merged ('1, 2'); a label pushed away from its point gets a leader line. Call it once everything
    is plotted: it fixes the figure's layout. Returns the annotations."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.font_manager import FontProperties

    fig = ax.figure
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()  # the layout (constrained, tight) is done now, and kept
    fig.set_layout_engine("none")
    to_px = ax.transData.transform
    frame = ax.get_window_extent(renderer)
    occupied, lines = _markers(ax, fig.dpi), _line_samples(ax)
    merged: list[list] = []  # [px, py, x, y, [texts], colour]
    for x, y, text, colour in items:
        px, py = to_px((x, y))
        same = next((m for m in merged if m[5] == colour and abs(m[0] - px) < 3 and abs(m[1] - py) < 3), None)
        if same is None:
            merged.append([px, py, x, y, [text], colour])
        elif text not in same[4]:
            same[4].append(text)
    font = FontProperties(size=fontsize)
    annotations = []
    for px, py, x, y, texts, colour in merged:
        text = ", ".join(texts)
        w, h, _ = renderer.get_text_width_height_descent(text, font, ismath=False)
        w, h = w + 4, h + 4  # a margin: the drawn text is a pixel off the measured one
        best = None
        for distance in (3, 8, 14, 22, 32, 44, 58):
            for ux, uy in ((1, 1), (1, 0), (1, -1), (0, 1), (0, -1), (-1, 1), (-1, 0), (-1, -1)):
                cx, cy = px + ux * (distance + w / 2), py + uy * (distance + h / 2)
                box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
                outside = box[0] < frame.x0 or box[1] < frame.y0 or box[2] > frame.x1 or box[3] > frame.y1
                # never on a label or a marker where there is room; then as little on lines and as near
                # as can be (a px of distance weighs a px^2 of line under the text)
                hard = sum(_overlap(box, other) for other in occupied)
                soft = sum(_overlap(box, other) for other in lines)
                cost = (outside, hard, soft + distance)
                if best is None or cost < best[0]:
                    best = (cost, distance, cx - px, cy - py, box)
        _, distance, dx, dy, box = best
        occupied.append(box)
        points = 72 / fig.dpi
        annotations.append(ax.annotate(
            text, (x, y), xytext=(dx * points, dy * points), textcoords="offset points", ha="center", va="center",
            fontsize=fontsize, color=colour,
            arrowprops=dict(arrowstyle="-", color=colour, lw=0.6, shrinkA=0, shrinkB=3) if distance > 8 else None))
    return annotations


def _markers(ax, dpi: float) -> list[tuple[float, float, float, float]]:
    """Screen boxes (x0, y0, x1, y1) of every marker drawn on `ax` (line markers and scatter points)."""
    boxes = []
    for line in ax.get_lines():
        if line.get_marker() in (None, "", "None", " "):
            continue
        r = line.get_markersize() / 2 * dpi / 72
        boxes += [(px - r, py - r, px + r, py + r) for px, py in ax.transData.transform(line.get_xydata())]
    for collection in ax.collections:
        sizes = collection.get_sizes()
        for i, (px, py) in enumerate(ax.transData.transform(collection.get_offsets())):
            r = math.sqrt(sizes[i % len(sizes)] if len(sizes) else 36) / 2 * dpi / 72
            boxes.append((px - r, py - r, px + r, py + r))
    return boxes


def _line_samples(ax, step: float = 3.0) -> list[tuple[float, float, float, float]]:
    """Small screen boxes every `step` px along every line drawn on `ax`."""
    boxes = []
    for line in ax.get_lines():
        if line.get_linestyle() in ("None", "", " "):
            continue
        r = max(1.0, line.get_linewidth())
        xy = ax.transData.transform(line.get_xydata())
        for (x0, y0), (x1, y1) in zip(xy[:-1], xy[1:]):
            n = max(1, int(math.hypot(x1 - x0, y1 - y0) / step))
            boxes += [(x - r, y - r, x + r, y + r) for t in range(n + 1)
                      for x, y in [(x0 + (x1 - x0) * t / n, y0 + (y1 - y0) * t / n)]]
    return boxes


def _overlap(a, b) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


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
