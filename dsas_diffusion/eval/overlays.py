"""The lambdas as pictures: a UNet lambda map over the image, the per-token lambdas of the prompt,
and side-by-side comparisons (unsteered | plain steering | DSAS).

`scales` is a pipeline output's `steering_scales`: text-encoder layers (prompts, tokens) and UNet
layers (steps, images, h, w). The map shown is the mean over UNet layers (each resized to the
image, bilinear) and denoising steps; the token lambdas are the mean over text-encoder layers.
PIL and numpy only.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# viridis at 0, .25, .5, .75, 1: dark = not steered, yellow = fully steered
_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32)
MIN_PANEL = 256


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
    text-encoder layers; ([], None) if no text-encoder layer was steered. BOS and EOS are left out;
    the sequence lambda is read at the last position (padding takes the sequence decision)."""
    rows = [lam[row].float() for lam in (scales or {}).values() if lam.dim() == 2]
    if not rows:
        return [], None
    lam = torch.stack(rows).mean(0)
    ids = tokenizer(prompt, padding="max_length", max_length=lam.shape[0], truncation=True).input_ids
    eos = tokenizer.eos_token_id
    end = next((i for i in range(1, len(ids)) if ids[i] == eos), len(ids))
    tokens = tokenizer.convert_ids_to_tokens(ids[1:end])
    pairs = [(t.replace("</w>", ""), round(float(v), 4)) for t, v in zip(tokens, lam[1:end])]
    return pairs, round(float(lam[-1]), 4)


def lambda_overlay(image: Image.Image, lam: torch.Tensor | None, tokens: list[tuple[str, float]] | None = None,
                   opacity: float = 0.55) -> Image.Image:
    """[image | image blended with the lambda map], above a strip of the prompt's tokens coloured by
    their lambda and a colour scale. Small images are enlarged (nearest) to at least 256 px wide."""
    image = image.convert("RGB")
    factor = max(1, math.ceil(MIN_PANEL / image.width))
    base = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    panels = [base]
    if lam is not None:
        heat = colormap(lam.numpy()).astype(np.float32)
        heat = np.asarray(Image.fromarray(heat.astype(np.uint8)).resize(base.size, Image.Resampling.NEAREST),
                          dtype=np.float32)
        blend = (1 - opacity) * np.asarray(base, dtype=np.float32) + opacity * heat
        panels.append(Image.fromarray(blend.round().astype(np.uint8)))
    top = _hstack(panels)
    font = ImageFont.load_default()
    strip = _token_strip(tokens or [], top.width, font)
    out = Image.new("RGB", (top.width, top.height + strip.height), "white")
    out.paste(top, (0, 0))
    out.paste(strip, (0, top.height))
    return out


def compare_strip(images: list[Image.Image], labels: list[str]) -> Image.Image:
    """Images side by side with a label above each (small images enlarged to at least 128 px)."""
    font = ImageFont.load_default()
    factor = max(1, math.ceil(128 / images[0].width))
    panels = [im.convert("RGB").resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST)
              for im in images]
    band = 18
    out = Image.new("RGB", (sum(p.width for p in panels), band + max(p.height for p in panels)), "white")
    draw = ImageDraw.Draw(out)
    x = 0
    for panel, label in zip(panels, labels):
        out.paste(panel, (x, band))
        draw.text((x + 4, 3), label, fill="black", font=font)
        x += panel.width
    return out


def _hstack(panels: list[Image.Image]) -> Image.Image:
    out = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width
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
