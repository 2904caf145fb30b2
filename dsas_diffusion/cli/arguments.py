"""argparse `type=` functions for the `dsas` options (and the toy and benchmark scripts).

A bad value becomes an argument error, `dsas fit: error: argument --steps: ...` with exit status
2, before any model is loaded: never a traceback from deep inside a run, and never a run that
finishes on a value that cannot mean anything (`--steps -1` saving pure noise). Each message says
what the value must be, the value given, and what to pass.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

MAX_SEEDS = 10_000  # per run; each seed is a whole image per prompt and variant
MAX_SEED = 2**32 - 1  # the range every seeded generator (torch, numpy, random) takes
MAX_IMAGE_SIDE = 8192  # pixels; the UNet's attention over a larger latent cannot fit any device's memory
MAX_GUIDANCE = 100.0  # classifier-free guidance beyond this saturates every image
MAX_ALPHAS = 100

Error = argparse.ArgumentTypeError


def _int(text: str, what: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise Error(f"{text!r} is not a whole number; pass {what}") from None


def _float(text: str, what: str) -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        raise Error(f"{text!r} is not a number; pass {what}") from None
    if not math.isfinite(value):
        raise Error(f"{text!r} is not a finite number; pass {what}")
    return value


def positive_int(text: str) -> int:
    value = _int(text, "a whole number of at least 1")
    if value < 1:
        raise Error(f"must be at least 1, got {value}")
    return value


def learning_rate(text: str) -> float:
    value = _float(text, "a learning rate such as 3e-3")
    if not 0 < value <= 1:
        raise Error(f"learning rate {value:g} is not in (0, 1]; pass e.g. 3e-3")
    return value


def seed(text: str) -> int:
    value = _int(text, f"a seed between 0 and {MAX_SEED}")
    if not 0 <= value <= MAX_SEED:
        raise Error(f"seed {value} is out of range; pass a seed between 0 and {MAX_SEED}")
    return value


def image_side(text: str) -> int:
    """Height / width in pixels: the VAE halves the image 3 times, so a multiple of 8."""
    value = _int(text, "a multiple of 8 such as 512")
    if value < 8 or value % 8 or value > MAX_IMAGE_SIDE:
        raise Error(f"{value} pixels is not a multiple of 8 between 8 and {MAX_IMAGE_SIDE}; pass e.g. 512")
    return value


def guidance(text: str) -> float:
    value = _float(text, "a guidance scale such as 7.5")
    if not 0 <= value <= MAX_GUIDANCE:
        raise Error(f"guidance scale {value:g} is out of range; pass a value between 0 and {MAX_GUIDANCE:g} "
                    "(7.5 is usual; 1 or less turns classifier-free guidance off)")
    return value


def fraction(text: str) -> float:
    """A share or accuracy in [0, 1]."""
    value = _float(text, "a number between 0 and 1 such as 0.75")
    if not 0 <= value <= 1:
        raise Error(f"{value:g} is not between 0 and 1; pass e.g. 0.75")
    return value


def probability_threshold(text: str) -> float:
    value = _float(text, "a probability between 0 and 1 such as 0.5")
    if not 0 < value < 1:
        raise Error(f"{value:g} is not strictly between 0 and 1 (at 0 every image would count as showing the "
                    "concept, at 1 none); pass e.g. 0.5")
    return value


def strength(text: str) -> float:
    """A steering strength alpha: finite, within the range the run-time options accept."""
    from ..core.options import check_strength

    value = _float(text, "a strength such as 1.0")
    try:
        return check_strength(value, "alpha")
    except (TypeError, ValueError) as e:
        raise Error(str(e)) from None


def strengths(text: str) -> list[float]:
    """A comma-separated grid of strengths > 0 (alpha 0, the unsteered baseline, is always drawn)."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise Error("the list is empty; write strengths separated by commas, e.g. '0.5,1,2'")
    if len(parts) > MAX_ALPHAS:
        raise Error(f"{len(parts)} strengths; a sweep takes at most {MAX_ALPHAS}")
    values = []
    for part in parts:
        value = strength(part)
        if value <= 0:
            raise Error(f"{part} is not > 0; every alpha must be > 0 (alpha 0 is the unsteered baseline, always "
                        "drawn), e.g. '0.5,1,2'")
        values.append(value)
    return values


def seeds(text: str) -> list[int]:
    """'0,1,2', '0-3' or a mix; duplicates dropped, order kept; at most MAX_SEEDS seeds."""
    how = "write '0,1,2' or '0-3'"
    spans = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            lo_value, hi_value = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise Error(f"seeds {text!r} are not non-negative whole numbers; {how}") from None
        if hi_value < lo_value:
            raise Error(f"seed range {part!r} runs backwards; write the smaller seed first, e.g. '0-3'")
        if hi_value > MAX_SEED:
            raise Error(f"seed {hi_value} is out of range; seeds go from 0 to {MAX_SEED}")
        spans.append((lo_value, hi_value))
    if not spans:
        raise Error(f"no seeds given; {how}")
    count = sum(hi - lo + 1 for lo, hi in spans)
    if count > MAX_SEEDS:
        raise Error(f"{text!r} gives {count} seeds; one run takes at most {MAX_SEEDS} (each seed draws an image per "
                    "prompt and variant): split the seeds over several runs")
    return list(dict.fromkeys(s for lo, hi in spans for s in range(lo, hi + 1)))


def regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as e:
        raise Error(f"{text!r} is not a regular expression ({e}); e.g. 'attn2' or 'encoder\\.layers\\.[0-3]\\.'") \
            from None
    return text


def output_folder(text: str) -> str:
    """A folder to write into: absent (created) or a folder, never a file, and not below a file."""
    _writable(text, "folder")
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise Error(f"{text} is a file, not a folder; pass a folder (it is created if missing)")
    return text


def output_file(text: str) -> str:
    """A file to write: absent or a file, never a folder, and not below a file."""
    _writable(text, "file")
    if Path(text).expanduser().is_dir():
        raise Error(f"{text} is a folder; pass a file name, e.g. report.json")
    return text


def _writable(text: str, what: str) -> None:
    if not str(text).strip():
        raise Error(f"empty path; pass a {what} name")
    path = Path(text).expanduser()
    for place in (path, *path.parents):
        if place.exists():
            if place != path and not place.is_dir():
                raise Error(f"{text} lies below {place}, which is a file; pass another {what}")
            if place.is_dir() and not os.access(place, os.W_OK):
                raise Error(f"cannot write in {place} (permission denied); pass another {what}")
            return


def device(text: str) -> str:
    """A torch device name that exists here: 'cpu', 'cuda', 'cuda:1', 'mps'."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise Error(f"{text!r} is not a torch device; pass cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise Error(f"{text}: no such CUDA device here ({torch.cuda.device_count()} visible); pass cpu or an index "
                    "below the number of GPUs")
    return text


def threads(text: str) -> int:
    value = positive_int(text)
    if value > 1024:
        raise Error(f"{value} threads is more than any CPU has; pass at most the number of cores")
    return value
