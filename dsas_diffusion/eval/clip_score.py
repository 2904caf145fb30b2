"""CLIP embeddings of images and texts, and the CLIP score of an image against its prompt.

Two backends behind one small interface (`image_embeddings`, `text_embeddings`, `logit_scale`):
transformers' `CLIPModel` (the default, `openai/clip-vit-base-patch32`) and open_clip (optional,
`pip install "dsas-diffusion[openclip]"`, imported only when asked for). The transformers backend
preprocesses images with PIL and torch only, as CLIP was trained (shortest side resized bicubic,
centre crop, normalised), so torchvision is never needed.

CLIP score: `100 * max(cos(image, prompt), 0)`, the convention of torchmetrics' `CLIPScore`.
`ClipScorer` is the `clip` scorer of `dsas eval` / `dsas sweep` (see scorers.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from .concept import check_concept_texts, concept_probabilities
from .drift import embedding_drift
from .scorers import Scorer, ScorerOptions, register_scorer

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_OPEN_CLIP_MODEL = "ViT-B-32:laion2b_s34b_b79k"
BACKENDS = ("transformers", "open_clip")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
OPEN_CLIP_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class ClipEmbedder:
    """Unit-norm CLIP embeddings; subclasses set `logit_scale` and implement the two `_encode_*`."""

    logit_scale: float = 100.0
    batch_size: int = 32

    def image_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        return self._batched(images, self._encode_images)

    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        return self._batched(list(texts), self._encode_texts)

    @torch.no_grad()
    def _batched(self, items, encode) -> torch.Tensor:
        out = [encode(items[i:i + self.batch_size]) for i in range(0, len(items), self.batch_size)]
        return torch.nn.functional.normalize(torch.cat(out).float().cpu(), dim=-1)


class TransformersClip(ClipEmbedder):
    """transformers' `CLIPModel` + `CLIPTokenizer` from a hub id or a local folder."""

    def __init__(self, model: str = DEFAULT_CLIP_MODEL, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 32):
        from transformers import CLIPModel, CLIPTokenizer

        try:
            self.model = CLIPModel.from_pretrained(model).to(device, dtype).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(model)
        except OSError as e:
            raise OSError(f"could not load the CLIP model {model!r} ({e}); pass --clip-model with a local CLIP folder "
                          "(config.json, weights, tokenizer files) or a hub id you can reach") from None
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        self.image_size = self.model.config.vision_config.image_size
        self.mean, self.std = _normalisation(model)
        self.max_length = self.model.config.text_config.max_position_embeddings
        self.logit_scale = float(self.model.logit_scale.detach().exp())

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return preprocess_image(image, self.image_size, self.mean, self.std)

    def _encode_images(self, images):
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device, self.dtype)
        return _features(self.model.get_image_features(pixel_values=pixels))

    def _encode_texts(self, texts):
        ids = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return _features(self.model.get_text_features(**ids.to(self.device)))


class OpenClip(ClipEmbedder):
    """open_clip models: `ARCH:PRETRAINED_TAG` (e.g. `ViT-B-32:laion2b_s34b_b79k`) or `hf-hub:org/name`."""

    def __init__(self, model: str = DEFAULT_OPEN_CLIP_MODEL, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 32):
        open_clip = import_open_clip()
        if model.startswith("hf-hub:"):
            arch, pretrained = model, None
        else:
            arch, _, pretrained = model.partition(":")
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=pretrained or None, device=device, precision=open_clip_precision(dtype))
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        self.logit_scale = float(self.model.logit_scale.detach().exp())

    def _encode_images(self, images):
        # in the model's dtype, as open_clip's own evaluation feeds a fp16 / bf16 model (no autocast here)
        pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device, self.dtype)
        return self.model.encode_image(pixels)

    def _encode_texts(self, texts):
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


def open_clip_precision(dtype: torch.dtype) -> str:
    """open_clip's name for a dtype: its weights (bar layer norms) are created in it."""
    if dtype not in OPEN_CLIP_PRECISION:
        raise ValueError(f"the open_clip backend cannot run in {dtype}; pass --dtype float32, float16 or bfloat16")
    return OPEN_CLIP_PRECISION[dtype]


def import_open_clip():
    try:
        import open_clip
    except ImportError as e:
        raise ImportError(
            f"the open_clip backend needs the open-clip-torch package ({e}); install it with "
            '`pip install "dsas-diffusion[openclip]"` (it pulls torchvision, which must match your torch build), '
            "or use the default transformers backend"
        ) from None
    return open_clip


def load_clip(backend: str = "transformers", model: str | None = None, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32, batch_size: int = 32) -> ClipEmbedder:
    """A CLIP embedder: `backend` 'transformers' (default model openai/clip-vit-base-patch32) or 'open_clip'."""
    if backend == "transformers":
        return TransformersClip(model or DEFAULT_CLIP_MODEL, device, dtype, batch_size)
    if backend == "open_clip":
        return OpenClip(model or DEFAULT_OPEN_CLIP_MODEL, device, dtype, batch_size)
    raise ValueError(f"CLIP backend {backend!r} is unknown; choose one of {list(BACKENDS)}")


def clip_scores(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """CLIP score of each image against its own text (row i against row i): 100 * max(cos, 0)."""
    if image_embeddings.shape != text_embeddings.shape:
        raise ValueError(f"{image_embeddings.shape[0]} images but {text_embeddings.shape[0]} prompts; pass one prompt "
                         "per image")
    return 100 * (image_embeddings * text_embeddings).sum(-1).clamp_min(0)


def preprocess_image(image: Image.Image, size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """CLIP's preprocessing with PIL: shortest side to `size` (bicubic), centre crop, scale, normalise."""
    image = image.convert("RGB")
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)  # transformers' rounding: truncation
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
    pixels = pixels.permute(2, 0, 1).float() / 255.0
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


@register_scorer("clip")
class ClipScorer(Scorer):
    """Per image: `clip_score` against its prompt, `drift_clip` from its twin (1 - cosine of the image
    embeddings) and, given concept texts, `clip_concept_prob` by zero-shot classification."""

    concept_hint = "pass concept and anti-concept texts (--concept / --anti-concept, or --prompt-set)"
    columns = (("clip_score", "clip_score", "mean", "CLIP score"), ("drift_clip", "drift_clip", "mean", "drift (CLIP)"))

    def __init__(self, embedder: ClipEmbedder, concept=(), anti_concept=(), threshold: float = 0.5,
                 settings: dict | None = None):
        if concept or anti_concept:
            check_concept_texts(concept, anti_concept)
        self.embedder, self.threshold, self._settings = embedder, threshold, settings or {}
        self._concept = embedder.text_embeddings(list(concept)) if concept else None
        self._anti = embedder.text_embeddings(list(anti_concept)) if concept else None

    @classmethod
    def load(cls, options: ScorerOptions) -> "ClipScorer":
        default = DEFAULT_CLIP_MODEL if options.clip_backend == "transformers" else DEFAULT_OPEN_CLIP_MODEL
        embedder = load_clip(options.clip_backend, options.clip_model, options.device, options.dtype,
                             options.batch_size)
        settings = {"clip_backend": options.clip_backend, "clip_model": options.clip_model or default,
                    "clip_dtype": str(options.dtype).replace("torch.", ""), "concept": list(options.concept),
                    "anti_concept": list(options.anti_concept), "concept_threshold": options.concept_threshold}
        return cls(embedder, options.concept, options.anti_concept, options.concept_threshold, settings)

    @classmethod
    def judges(cls, options: ScorerOptions) -> bool:
        return bool(options.concept)

    def settings(self) -> dict:
        return self._settings

    def score(self, images, prompts, twins):
        emb = self.embedder.image_embeddings(images)
        cs = clip_scores(emb, self.embedder.text_embeddings(prompts))
        cp = (concept_probabilities(emb, self._concept, self._anti, self.embedder.logit_scale)
              if self._concept is not None else None)
        out = []
        for i, twin in enumerate(twins):
            fields = {"clip_score": round(float(cs[i]), 4), "drift_clip": None}
            if twin is not None and twin != i:
                fields["drift_clip"] = round(float(embedding_drift(emb[i:i + 1], emb[twin:twin + 1])[0]), 6)
            if cp is not None:
                fields["clip_concept_prob"] = round(float(cp[i]), 4)
            out.append(fields)
        return out

    def concept(self, fields: dict) -> tuple[float, bool]:
        if self._concept is None:
            return super().concept(fields)
        p = fields["clip_concept_prob"]
        return p, p > self.threshold


def _features(out) -> torch.Tensor:
    # transformers 4 returns the projected features as a tensor, transformers 5 as an output's pooler_output
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _normalisation(model: str) -> tuple[tuple, tuple]:
    """image_mean / image_std from the model's preprocessor_config.json, else OpenAI CLIP's."""
    path = Path(model) / "preprocessor_config.json"
    if not path.is_file():
        try:
            from transformers.utils import cached_file

            found = cached_file(model, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False,
                                _raise_exceptions_for_connection_errors=False)
            path = Path(found) if found else path
        except (OSError, ValueError, TypeError):
            pass
    if path.is_file():
        cfg = json.loads(path.read_text(encoding="utf-8"))
        return tuple(cfg.get("image_mean", OPENAI_MEAN)), tuple(cfg.get("image_std", OPENAI_STD))
    return OPENAI_MEAN, OPENAI_STD
