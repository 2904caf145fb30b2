"""The lambdas as a picture: which tokens were steered, at which layer, and how hard.

`lambdas` is what `handle.scales` holds ({layer name: (batch, tokens)}, pick a row with `row=`),
a {layer name: (tokens,)} dict, a 1-D sequence (one row), or a 2-D array (layers, tokens).
After `generate()` the scales cover every token but the last generated one (that token is never
fed back through the model), so pass `tokens[:-1]`.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import torch

from ..core.io import atomic_path


def lambda_table(lambdas, *, row: int | None = None, mean: bool = False) -> tuple[list[str], torch.Tensor]:
    """(row labels, (rows, tokens) float tensor) from any of the accepted `lambdas` forms."""
    if isinstance(lambdas, dict):
        if not lambdas:
            raise ValueError("lambdas is an empty dict: no layer was steered (was the handle attached during the "
                             "call, with a strength above 0?)")
        labels, rows = [], []
        for name, lam in lambdas.items():
            lam = torch.as_tensor(lam).detach().float().cpu()
            if lam.dim() == 2:
                if row is None and lam.shape[0] != 1:
                    raise ValueError(f"lambdas of layer {name!r} hold {lam.shape[0]} batch rows; "
                                     "pass row= the one to draw")
                lam = lam[0 if row is None else row]
            if lam.dim() != 1:
                raise ValueError(f"lambdas of layer {name!r} have shape {tuple(lam.shape)}; "
                                 "expected (tokens,) or (batch, tokens)")
            labels.append(name)
            rows.append(lam)
        if len({len(r) for r in rows}) != 1:
            raise ValueError("the layers' lambdas differ in length; pass lambdas of one call")
        table = torch.stack(rows)
    else:
        table = torch.as_tensor(lambdas).detach().float().cpu()
        if table.dim() == 1:
            table, labels = table.unsqueeze(0), ["lambda"]
        elif table.dim() == 2:
            labels = [f"layer {i}" for i in range(table.shape[0])]
        else:
            raise ValueError(f"lambdas of shape {tuple(table.shape)}: expected (tokens,), (layers, tokens) or a dict")
    if mean:
        table, labels = table.mean(0, keepdim=True), [f"mean over {len(labels)} layers"]
    return labels, table


def _checked(tokens, lambdas, row, mean) -> tuple[list[str], list[str], torch.Tensor]:
    if isinstance(tokens, str):
        raise TypeError("tokens must be a list of token strings, e.g. tokenizer.convert_ids_to_tokens(ids)")
    tokens = [str(t) for t in tokens]
    labels, table = lambda_table(lambdas, row=row, mean=mean)
    if table.shape[1] != len(tokens):
        hint = (" After generate() the last generated token is never run through the model: pass tokens[:-1]"
                if len(tokens) == table.shape[1] + 1 else "")
        raise ValueError(f"got {len(tokens)} tokens but {table.shape[1]} lambdas per layer; "
                         f"pass one token per lambda.{hint}")
    return tokens, labels, table


def _display(token: str) -> str:
    """Byte-level BPE and SentencePiece mark a leading space with a symbol; show a space instead."""
    return token.replace("\u0120", " ").replace("\u2581", " ").replace("\u010a", "\\n") or "\u2423"


def token_heatmap_html(tokens, lambdas, *, row: int | None = None, mean: bool = False,
                       title: str | None = None) -> str:
    """A self-contained HTML fragment: one line per layer (or their mean), each token shaded by its
    lambda (white = not steered, red = fully steered); hovering a token shows the value."""
    tokens, labels, table = _checked(tokens, lambdas, row, mean)
    lines = ["<div class='dsas-lambdas' style='font-family:monospace;line-height:1.9'>"]
    if title:
        lines.append(f"<div style='font-weight:bold'>{html.escape(title)}</div>")
    for label, values in zip(labels, table.tolist()):
        spans = "".join(
            f"<span title='{html.escape(label, quote=True)}: lambda={v:.3f}' style='background:rgba(214,39,40,"
            f"{min(max(v, 0.0), 1.0):.3f});padding:1px 2px;white-space:pre'>{html.escape(_display(t))}</span>"
            for t, v in zip(tokens, values)
        )
        label_cell = f"<span style='display:inline-block;min-width:16em;color:#555'>{html.escape(label)}</span>"
        lines.append(f"<div>{label_cell}{spans}</div>")
    lines.append("</div>")
    return "\n".join(lines)


def token_heatmap_png(tokens, lambdas, path: str | os.PathLike, *, row: int | None = None, mean: bool = False,
                      title: str | None = None, dpi: int = 100) -> Path:
    """Write the heatmap (layers x tokens, lambda 0..1) as a PNG, atomically; returns the path."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("token_heatmap_png needs matplotlib: `pip install matplotlib` "
                          "(or `pip install dsas-diffusion[plot]`)") from None
    tokens, labels, table = _checked(tokens, lambdas, row, mean)
    fig = Figure(figsize=(max(4.0, 0.35 * len(tokens) + 2.5), max(1.6, 0.35 * len(labels) + 1.4)))
    ax = fig.add_subplot()
    image = ax.imshow(table.numpy(), cmap="Reds", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(tokens)), [_display(t) for t in tokens], rotation=90, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="lambda")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path
