"""The lambdas as pictures: a denoiser lambda map over the image, the per-token lambdas of the prompt,
and side-by-side comparisons (unsteered | plain steering | DSAS), each captioned with what it shows.

`scales` is a pipeline output's `steering_scales`: text-encoder layers (prompts, tokens) and denoiser
layers (steps, images, h, w). The map shown is the mean over denoiser layers (each resized to the
image, bilinear) and denoising steps; the token lambdas are the mean over text-encoder layers;
`averaged_over` says which, in the overlay's caption. Small images are enlarged (nearest) so that
the text drawn next to them is legible. PIL and numpy only.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# viridis at 0, .25, .5, .75, 1: dark = not steered, yellow = fully steered
_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32)
MIN_PANEL = 256  # px: a 32 px toy image is drawn 8x, so a caption's lines are not wider than the picture
FONT_SIZE = 13
GAP = 6  # px of white between side-by-side pictures


def colormap(values) -> np.ndarray:
    """uint8 RGB colours (..., 3) for values in [0, 1]."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0, 1) * (len(_ANCHORS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_ANCHORS) - 2)
    t = (v - lo)[..., None]
    return ((1 - t) * _ANCHORS[lo] + t * _ANCHORS[lo + 1]).round().astype(np.uint8)


def lambda_map(scales: dict[str, torch.Tensor] | None, size: tuple[int, int], row: int = 0) -> torch.Tensor | None:
    """(H, W) mean lambda over UNet layers and steps for image `row`, at `size` = (width, height); None if
    no UNet layer was steered."""
    width, height = size
    maps = []
    for lam in (scales or {}).values():
        if lam.dim() != 4:
            continue
        m = lam[:, row].float().mean(0)[None, None]
        m = torch.nn.functional.interpolate(m, size=(height, width), mode="bilinear", align_corners=False)
        maps.append(m[0, 0])
    return torch.stack(maps).mean(0).clamp(0, 1) if maps else None


def token_lambdas(scales: dict[str, torch.Tensor] | None, tokenizer, prompt: str,
                  row: int = 0) -> tuple[list[tuple[str, float]], float | None]:
    """([(token, lambda)] for the prompt's real tokens, the sequence-level lambda) averaged over the
    text-encoder layers; ([], None) if no text-encoder layer was steered. A BOS (CLIP's, never steered)
    and the EOS are left out; a tokenizer with no BOS (T5) starts with a word, which is shown. The
    sequence lambda is read at the last position (padding takes the sequence decision)."""
    rows = [lam[row].float() for lam in (scales or {}).values() if lam.dim() == 2]
    if not rows:
        return [], None
    lam = torch.stack(rows).mean(0)
    ids = tokenizer(prompt, padding="max_length", max_length=lam.shape[0], truncation=True).input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    start = 1 if bos is not None and ids and ids[0] == bos else 0
    end = next((i for i in range(start, len(ids)) if ids[i] == eos), len(ids))
    pairs = [(tokenizer.decode([i]).strip(), round(float(v), 4)) for i, v in zip(ids[start:end], lam[start:end])]
    return pairs, round(float(lam[-1]), 4)


def averaged_over(scales: dict[str, torch.Tensor] | None, text_prefix: str = "text_encoder.") -> str:
    """The overlay's caption: which layers (and steps) the map and the token lambdas are means of."""
    scales = scales or {}
    maps = [n for n, lam in scales.items() if lam.dim() == 4]
    texts = [n for n, lam in scales.items() if lam.dim() == 2 and n.startswith(text_prefix)]
    lines = []
    if maps:
        steps = scales[maps[0]].shape[0]
        lines.append(f"lambda map: mean over {steps} denoising step{'s' * (steps != 1)} and {_layers(maps)}")
    if texts:
        lines.append(f"token lambdas: mean over {_layers(texts)}")
    return "\n".join(lines)


def _layers(names: list[str]) -> str:
    """'3 layers of transformer: a, b, c' (the first and last of a long list)."""
    component = names[0].split(".", 1)[0]
    short = [n.split(".", 1)[1] if n.startswith(f"{component}.") else n for n in names]
    shown = ", ".join(short) if len(short) <= 3 else f"{short[0]}, ..., {short[-1]}"
    return f"{len(names)} layer{'s' * (len(names) != 1)} of {component}: {shown}"


def lambda_overlay(image: Image.Image, lam: torch.Tensor | None, tokens: list[tuple[str, float]] | None = None,
                   opacity: float = 0.55, caption: str = "") -> Image.Image:
    """[image | image blended with the lambda map], above a strip of the prompt's tokens coloured by
    their lambda, a colour scale and `caption` (see `averaged_over`). Small images are enlarged
    (nearest) to at least MIN_PANEL px wide."""
    image = image.convert("RGB")
    base = _enlarged(image, MIN_PANEL)
    panels = [base]
    if lam is not None:
        heat = colormap(lam.numpy()).astype(np.float32)
        heat = np.asarray(Image.fromarray(heat.astype(np.uint8)).resize(base.size, Image.Resampling.NEAREST),
                          dtype=np.float32)
        blend = (1 - opacity) * np.asarray(base, dtype=np.float32) + opacity * heat
        panels.append(Image.fromarray(blend.round().astype(np.uint8)))
    top = _hstack(panels, gap=GAP)
    font = _font()
    return _vstack([top, _token_strip(tokens or [], top.width, font), _text_block(caption, top.width, font)])


def compare_strip(images: list[Image.Image], labels: list[str], caption: str = "") -> Image.Image:
    """Images side by side with a label above each and `caption` (the prompt, seed and strength)
    below; small images are enlarged (nearest) to at least MIN_PANEL px wide."""
    font = _font()
    panels = [_enlarged(im.convert("RGB"), MIN_PANEL) for im in images]
    heads = [_text_block(label, p.width, font) for label, p in zip(labels, panels)]
    band = max(h.height for h in heads)
    columns = []
    for head, panel in zip(heads, panels):
        column = Image.new("RGB", (panel.width, band + panel.height), "white")
        column.paste(head, (0, 0))
        column.paste(panel, (0, band))
        columns.append(column)
    top = _hstack(columns, gap=GAP)
    return _vstack([top, _text_block(caption, top.width, font)])


def _font(size: int = FONT_SIZE):
    return ImageFont.load_default(size=size)


def _enlarged(image: Image.Image, width: int) -> Image.Image:
    factor = max(1, math.ceil(width / image.width))
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def _text_block(text: str, width: int, font, pad: int = 4) -> Image.Image:
    """`text` in black on white, wrapped at spaces to `width`; a 0-px-high block for no text."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = []
    for paragraph in text.splitlines() if text else []:
        line = ""
        for word in paragraph.split(" "):
            trial = f"{line} {word}" if line else word
            if line and measure.textlength(trial, font=font) > width - 2 * pad:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    step = font.size + 3 if hasattr(font, "size") else 14
    block = Image.new("RGB", (width, (len(lines) * step + 2 * pad) if lines else 0), "white")
    draw = ImageDraw.Draw(block)
    for i, line in enumerate(lines):
        draw.text((pad, pad + i * step), line, fill="black", font=font)
    return block


def _vstack(panels: list[Image.Image]) -> Image.Image:
    out = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)), "white")
    y = 0
    for p in panels:
        out.paste(p, (0, y))
        y += p.height
    return out


def _hstack(panels: list[Image.Image], gap: int = 0) -> Image.Image:
    out = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), max(p.height for p in panels)),
                    "white")
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + gap
    return out


def _token_strip(tokens: list[tuple[str, float]], width: int, font) -> Image.Image:
    """Rows of token boxes coloured by lambda, then a 0..1 colour scale."""
    pad, box_h = 4, 18
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes, x, y = [], pad, pad
    for text, lam in tokens:
        label = f"{text} {lam:.2f}"
        w = int(measure.textlength(label, font=font)) + 2 * pad
        if x + w > width - pad and x > pad:
            x, y = pad, y + box_h + pad
        boxes.append((x, y, w, label, lam))
        x += w + pad
    scale_y = (y + box_h + pad) if tokens else pad
    strip = Image.new("RGB", (width, scale_y + box_h + pad), "white")
    draw = ImageDraw.Draw(strip)
    for bx, by, w, label, lam in boxes:
        colour = tuple(int(c) for c in colormap(lam))
        draw.rectangle((bx, by, bx + w, by + box_h), fill=colour)
        draw.text((bx + pad, by + 3), label, fill="white" if lam < 0.6 else "black", font=font)
    draw.text((pad, scale_y + 3), "lambda 0", fill="black", font=font)
    x0 = pad + int(measure.textlength("lambda 0", font=font)) + pad
    bar_w = max(32, min(160, width - x0 - 40))
    bar = colormap(np.linspace(0, 1, bar_w))[None].repeat(box_h - 6, axis=0)
    strip.paste(Image.fromarray(bar), (x0, scale_y + 3))
    draw.text((x0 + bar_w + pad, scale_y + 3), "1", fill="black", font=font)
    return strip
