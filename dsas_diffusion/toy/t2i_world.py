"""A toy text-to-image world where concepts are measured on pixels by exact rules.

Images are 32x32 flat-coloured shapes on flat backgrounds, captioned "a {size} {colour} {shape}
on a {background} background". Because every pixel is either background or shape colour (up to
the model's noise), the colour of a generated shape and its shape class are read off the
pixels: no learned judge is involved.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (235, 210, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 7, "large": 12}  # half-width in pixels


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} on a {self.background} background"


def all_scenes() -> list[Scene]:
    return [Scene(c, s, z, b) for c, s, z, b in itertools.product(COLOURS, SHAPES, SIZES, BACKGROUNDS)]


def render(scene: Scene, jitter: tuple[int, int] = (0, 0)) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    r = SIZES[scene.size]
    cx, cy = SIZE // 2 + jitter[0], SIZE // 2 + jitter[1]
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def dataset(n: int, seed: int = 0, jitter: int = 2) -> tuple[np.ndarray, list[str]]:
    """n images (n, 32, 32, 3) uint8 and their captions, every scene equally often."""
    rng = random.Random(seed)
    scenes = all_scenes()
    images, captions = [], []
    for i in range(n):
        scene = scenes[i % len(scenes)]
        offset = (rng.randint(-jitter, jitter), rng.randint(-jitter, jitter))
        images.append(np.asarray(render(scene, offset)))
        captions.append(scene.caption)
    return np.stack(images), captions


# ---- exact rules on generated pixels ------------------------------------------------------------

def _nearest(pixels: np.ndarray, palette: dict[str, tuple]) -> tuple[list[str], np.ndarray]:
    names = list(palette)
    ref = np.array([palette[k] for k in names], dtype=np.float32)
    d = np.linalg.norm(pixels[..., None, :].astype(np.float32) - ref, axis=-1)
    return names, d


def foreground(image: np.ndarray, background: str) -> np.ndarray:
    """Pixels farther than 60 (RGB distance) from the scene's background colour."""
    bg = np.array(BACKGROUNDS[background], dtype=np.float32)
    return np.linalg.norm(image.astype(np.float32) - bg, axis=-1) > 60


def colour_of(image: np.ndarray, background: str) -> str | None:
    """The palette colour most foreground pixels are nearest to (None: no foreground)."""
    fg = foreground(image, background)
    if fg.sum() < 8:
        return None
    names, d = _nearest(image[fg], COLOURS)
    counts = np.bincount(d.argmin(-1), minlength=len(names))
    return names[int(counts.argmax())]


def colour_fraction(image: np.ndarray, background: str, colour: str) -> float:
    """Share of foreground pixels nearest to `colour` and within 90 of it."""
    fg = foreground(image, background)
    if fg.sum() == 0:
        return 0.0
    names, d = _nearest(image[fg], COLOURS)
    k = names.index(colour)
    return float(((d.argmin(-1) == k) & (d[:, k] < 90)).mean())


def shape_of(image: np.ndarray, background: str) -> str | None:
    """By how much of its bounding box the foreground fills: square ~1, circle ~0.79, triangle ~0.5."""
    fg = foreground(image, background)
    if fg.sum() < 8:
        return None
    ys, xs = np.nonzero(fg)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = fg.sum() / box
    return "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"


def faithful(image: np.ndarray, scene: Scene) -> bool:
    """Does the image show what its caption asked for (colour and shape)?"""
    return colour_of(image, scene.background) == scene.colour and shape_of(image, scene.background) == scene.shape


def parse(caption: str) -> Scene:
    words = caption.split()
    return Scene(colour=words[2], shape=words[3], size=words[1], background=words[6])


# ---- the DiT world's captions: a concept asked for in several ways ------------------------------
# The UNet world's captions above are one template; the DiT world (dsas_diffusion.toy.train_dit)
# is trained on every phrasing below. Fitting uses FIT_TEMPLATES with the plain words only; the
# other templates and the synonyms are held out, to measure whether a gate fitted on one way of
# asking still fires on the others.

SYNONYMS = {"red": ("red", "crimson", "scarlet"), "circle": ("circle", "disc", "round shape")}
TEMPLATES = (
    "a {size} {colour} {shape} on a {background} background",
    "a {size} {shape} in {colour} on a {background} background",
    "a {background} background with a {size} {colour} {shape}",
    "on a {background} background a {size} {colour} {shape}",  # held out: word order
    "a {size} {shape} that is {colour} on a {background} background",  # held out: relative clause
)
FIT_TEMPLATES = (0, 1, 2)
HELD_OUT_TEMPLATES = (3, 4)
BACKGROUND_WORD = "background"


def words_for(name: str) -> tuple[str, ...]:
    """Every word the DiT world's captions use for a colour or shape (the name itself first)."""
    return SYNONYMS.get(name, (name,))


def phrase(scene: Scene, template: int = 0, colour: str | None = None, shape: str | None = None) -> str:
    """`scene` in TEMPLATES[template], with the given words for its colour and shape (default: their names)."""
    return TEMPLATES[template].format(size=scene.size, background=scene.background,
                                      colour=colour or scene.colour, shape=shape or scene.shape)


def phrasings(scene: Scene) -> list[str]:
    """Every caption of `scene` in the DiT world: each template with each word for its colour and shape."""
    return [phrase(scene, t, c, s) for t in range(len(TEMPLATES)) for c in words_for(scene.colour)
            for s in words_for(scene.shape)]


def dit_vocabulary() -> list[str]:
    """Every word of the DiT world's captions, in a fixed order (its tokenizer's vocabulary)."""
    words = [w for t in TEMPLATES for w in t.replace("{", " {").split() if not w.startswith("{")]
    words += [w for name in (*COLOURS, *SHAPES) for syn in words_for(name) for w in syn.split()]
    return list(dict.fromkeys(words + list(SIZES) + list(BACKGROUNDS)))


def read_caption(caption: str) -> Scene:
    """The scene a caption of either world asks for, by its words (any template, any synonym)."""
    words = caption.split()
    spelled = {w: name for name in (*COLOURS, *SHAPES) for syn in words_for(name) for w in syn.split()[:1]}
    colour = next(spelled[w] for w in words if spelled.get(w) in COLOURS)
    shape = next(spelled[w] for w in words if spelled.get(w) in SHAPES)
    size = next(w for w in words if w in SIZES)
    background = words[words.index(BACKGROUND_WORD) - 1]
    return Scene(colour=colour, shape=shape, size=size, background=background)
