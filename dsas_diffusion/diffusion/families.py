"""The per-family adapter table: the one place that knows a pipeline family's conventions.

A family is recognised by the stock diffusers class a pipeline is (or subclasses), and says:
- its text encoders and their tokenizers (the padding of each is read from the `attention_mask`
  the pipeline passes, or from the token ids when it passes none: positions after the first EOS),
  and which of them start a prompt with a BOS token: `skip_first_token` skips that BOS, and where
  there is none (T5) the first token is a word of the prompt, steered, fitted and shown like the rest;
- its denoiser, the layers steered by default, and which element of a layer's output is the
  image stream (SD3 and FLUX joint blocks return `(text, image)`; their attention `(image, text)`);
- how classifier-free guidance is laid out: `batched` [negative; positive] halves of one denoiser
  batch (SD, SDXL, SD3, PixArt), or `separate` calls (FLUX's true CFG, under `cache_context("uncond")`);
- how to encode prompts the way the pipeline does (for fitting), and which of `encode_prompt`'s
  outputs are the positive branch (so the negative prompts can be encoded in a call of their own).
The latent grid of image tokens (patchified in DiTs, packed 2x2 in FLUX) is read from the latent
size, height // vae_scale_factor, and each layer's token count.
A new family is one entry here plus tests.

Pooled text embeddings (SDXL's and SD3's from their CLIP encoders' last layer, FLUX's from CLIP) are
not steered separately: each is its encoder's projection of the EOS token after the last layer, so it
follows the steering of that encoder's layers through the EOS position, with that position's own lambda
[choice: measured on a tiny random SDXL with a fitted steering, the pooled embedding moved by 13% on
held-out concept prompts and 12% on control ones, where the hidden states the UNet reads moved by 32%
and 14%: the gate separates far less at EOS after the last layer than over the tokens].
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

# Residual stream after each CLIP / T5 encoder layer (per prompt token); transformers 4 / 5 layouts.
TEXT_ENCODER_LAYERS = r"(text_model\.)?encoder\.(layers|block)\.\d+"
# Cross-attention outputs of every UNet transformer block: where the prompt enters the image
# [choice: self-attention can be added with r".*\.attn[12]"].
UNET_LAYERS = r".*transformer_blocks\.\d+\.attn2"
# DiTs: the image-side output of each joint attention (SD3, FLUX: element 0 is the image stream).
# Measured on tiny random DiTs: the prompt signal is weak in block outputs and clear here.
JOINT_ATTENTION_LAYERS = r"transformer_blocks\.\d+\.attn"
PIXART_LAYERS = r"transformer_blocks\.\d+\.attn2"

Guidance = Literal["batched", "separate"]


@dataclass(frozen=True)
class Family:
    """One pipeline family's conventions (see the module docstring)."""

    name: str
    pipeline: str  # the stock diffusers class
    text_encoders: tuple[tuple[str, str], ...]  # (text encoder, its tokenizer) components
    denoiser: str  # "unet" or "transformer"
    denoiser_layers: str
    guidance: Guidance
    # (pipe, prompts, device, call options) -> the pipeline's own encode_prompt, positive branch only
    encode: Callable
    # encode_prompt's outputs that are the positive branch, by the argument that takes them back, and
    # whether encode_prompt repeats embeddings given that way per image (SD3 repeats only those it encodes)
    positive_outputs: dict[str, int] = field(default_factory=dict)
    repeats_given_embeddings: bool = True
    # output element that is the image stream, by module class; anything else: element 0
    image_element: dict[str, int] = field(default_factory=dict)
    max_length: dict[str, int] = field(default_factory=dict)  # tokens an encoder reads, where not 77
    # a denoiser argument given only to extra positive-only forwards (SD3's skip-layer guidance)
    extra_forward: str | None = None
    # text encoders whose tokenizer starts a prompt with no BOS token (T5)
    without_bos: tuple[str, ...] = ()

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(te for te, _ in self.text_encoders) + (self.denoiser,)

    def tokenizer_of(self, text_encoder: str) -> str:
        return dict(self.text_encoders)[text_encoder]

    def has_bos(self, component: str) -> bool:
        """Whether the first position `component` reads is a BOS token, the same in every prompt (CLIP),
        rather than a word (T5) or an image patch (the denoiser): what `skip_first_token` skips."""
        return component != self.denoiser and component not in self.without_bos

    def skip_first_token(self, component: str, skip_first_token: bool) -> bool:
        """The steering's `skip_first_token` as it applies to `component`, at run time and in fitting."""
        return skip_first_token and self.has_bos(component)

    def element(self, module: torch.nn.Module) -> int:
        return self.image_element.get(type(module).__name__, 0)


def denoiser_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The latents of a denoiser call: the UNet's `sample`, a DiT's `hidden_states`."""
    x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    return x if isinstance(x, torch.Tensor) else None


def _encode_options(pipe, options: dict) -> dict:
    """The pipeline-call options that encode_prompt also takes (max_sequence_length, clip_skip, ...)."""
    import inspect

    return {k: v for k, v in options.items() if k in inspect.signature(pipe.encode_prompt).parameters}


def _encode_sd(pipe, prompts, device, options):
    return pipe.encode_prompt(prompts, device, 1, False, **_encode_options(pipe, options))


def _encode_sdxl(pipe, prompts, device, options):
    return pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False,
                              **_encode_options(pipe, options))


def _encode_sd3(pipe, prompts, device, options):
    return pipe.encode_prompt(prompts, None, None, device=device, do_classifier_free_guidance=False,
                              **_encode_options(pipe, options))


def _encode_flux(pipe, prompts, device, options):
    return pipe.encode_prompt(prompts, device=device, **_encode_options(pipe, options))


def _encode_pixart(pipe, prompts, device, options):
    # the pipeline's __call__ cleans captions by default, its encode_prompt does not
    options = {"clean_caption": True, **options}
    return pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                              **_encode_options(pipe, options))


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("stable_diffusion", "StableDiffusionPipeline", (("text_encoder", "tokenizer"),), "unet", UNET_LAYERS,
           "batched", _encode_sd, positive_outputs={"prompt_embeds": 0}),
    Family("stable_diffusion_xl", "StableDiffusionXLPipeline",
           (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")), "unet", UNET_LAYERS, "batched",
           _encode_sdxl, positive_outputs={"prompt_embeds": 0, "pooled_prompt_embeds": 2}),
    Family("stable_diffusion_3", "StableDiffusion3Pipeline",
           (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3")),
           "transformer", JOINT_ATTENTION_LAYERS, "batched", _encode_sd3,
           positive_outputs={"prompt_embeds": 0, "pooled_prompt_embeds": 2}, repeats_given_embeddings=False,
           extra_forward="skip_layers", image_element={"JointTransformerBlock": 1}, max_length={"text_encoder_3": 256},
           without_bos=("text_encoder_3",)),
    Family("flux", "FluxPipeline", (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")),
           "transformer", JOINT_ATTENTION_LAYERS, "separate", _encode_flux,
           image_element={"FluxTransformerBlock": 1, "FluxSingleTransformerBlock": 1},
           max_length={"text_encoder_2": 512}, without_bos=("text_encoder_2",)),
    Family("pixart_sigma", "PixArtSigmaPipeline", (("text_encoder", "tokenizer"),), "transformer", PIXART_LAYERS,
           "batched", _encode_pixart, positive_outputs={"prompt_embeds": 0, "prompt_attention_mask": 1},
           max_length={"text_encoder": 300}, without_bos=("text_encoder",)),
)}
_BY_CLASS = {f.pipeline: f for f in FAMILIES.values()}


def family_of(pipe) -> Family:
    """The family of a pipeline object: the first stock class of the table among its classes."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in _BY_CLASS:
            return _BY_CLASS[cls.__name__]
    raise TypeError(f"DSAS does not know the pipeline class {type(pipe).__name__}; supported: "
                    f"{', '.join(sorted(_BY_CLASS))} and their subclasses")


def family_of_index(index: dict, where: str) -> Family:
    """The family of a saved pipeline, from the `_class_name` of its model_index.json (a DSAS named
    pipeline's name maps to its stock class)."""
    name = index.get("_class_name", "") if isinstance(index, dict) else ""
    stock = name.replace("DSAS", "", 1) if name.startswith("DSAS") else name
    if stock not in _BY_CLASS:
        raise ValueError(f"{where} holds a {name or 'pipeline without a _class_name'}, which DSAS does not steer; "
                         f"supported: {', '.join(sorted(_BY_CLASS))}")
    return _BY_CLASS[stock]


def family_of_folder(path: str | os.PathLike) -> Family:
    with open(os.path.join(path, "model_index.json"), encoding="utf-8") as f:
        return family_of_index(json.load(f), str(path))
