"""Which modules of a Stable Diffusion pipeline are steered, and how their positions are read."""

from __future__ import annotations

import torch

from ..core.hooks import HookSet

# Residual stream after each CLIP encoder layer (per prompt token).
TEXT_ENCODER_LAYERS = r"(text_model\.)?encoder\.layers\.\d+"  # transformers 4 / 5 layouts
# Cross-attention outputs of every UNet transformer block (per spatial position): where the prompt
# enters the image [choice: self-attention can be added with r".*\.attn[12]"].
UNET_LAYERS = r".*transformer_blocks\.\d+\.attn2"

COMPONENTS = ("text_encoder", "unet")


def clip_token_mask(eos_token_id: int):
    """pre_forward for a CLIP text encoder: positions after the first EOS are padding.

    Stable Diffusion pads prompts to 77 tokens and the UNet cross-attends to all of them, so the
    padding is steered too, but with the sequence-level decision (see `SteeringConfig.gating`).
    """

    def pre_forward(hooks: HookSet, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor):
            hooks.valid = None
            return
        is_eos = ids == eos_token_id
        hooks.valid = (is_eos.long().cumsum(1) - is_eos.long()) == 0

    return pre_forward


def eos_token_id(tokenizer, text_encoder) -> int:
    tok = getattr(tokenizer, "eos_token_id", None)
    return tok if tok is not None else text_encoder.config.eos_token_id
