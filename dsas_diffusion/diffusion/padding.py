"""Which prompt positions are padding, read the way each text encoder sees its input.

Stable Diffusion pads prompts to 77 tokens and the denoiser attends to all of them, so padding is
steered too, but with the sequence-level decision (see `SteeringConfig.gating`), which is what the
gate was trained on. A pipeline that passes an `attention_mask` (PixArt's T5) says where padding
is; where none is passed (CLIP everywhere, T5 in SD3 and FLUX) the positions after the first EOS
are padding.
"""

from __future__ import annotations

import torch

from ..core.hooks import HookSet


def padding_mask(eos_token_id: int):
    """pre_forward for a text encoder: sets `valid` (B, K), True at real tokens."""

    def pre_forward(hooks: HookSet, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            hooks.valid = mask.bool()
            return
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
