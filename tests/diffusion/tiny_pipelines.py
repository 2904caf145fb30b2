"""Tiny random STOCK diffusers pipelines of five families, built offline in the style of diffusers'
own `get_dummy_components()`: seconds on a CPU, no hub, tokenizers read from `assets/`.

    components = tiny_components("flux")                  # the pipeline's __init__ keyword arguments
    pipe = tiny_pipeline("stable_diffusion_3")            # a stock StableDiffusion3Pipeline
    image = pipe("a red circle", generator=torch.Generator().manual_seed(0), **CALL_KWARGS["stable_diffusion_3"])
    path = save_tiny_pipeline("stable_diffusion_xl", tmp_path)  # a standard folder for from_pretrained

Family names are those of dsas_diffusion/diffusion/families.py.
The shapes are chosen so that the facts steering relies on are visible (see test_tiny_pipelines.py):
every VAE downsamples by 2, every DiT has more than one block and a token grid of several positions
per side, and the T5 and CLIP tokenizers split the tests' prompts into one token per word.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import ASSETS, TOKENIZER_DIR, tiny_sd_components

T5_TOKENIZER_DIR = ASSETS / "tiny-t5-tokenizer"

# family -> stock pipeline class name in diffusers, in order of priority.
PIPELINES = {
    "stable_diffusion": "StableDiffusionPipeline",
    "stable_diffusion_xl": "StableDiffusionXLPipeline",
    "pixart_sigma": "PixArtSigmaPipeline",
    "stable_diffusion_3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}
FAMILIES = tuple(PIPELINES)

# Per-family call arguments that make a stock call fast and valid (add prompt and generator).
# Guidance stays at each pipeline's default, so SD / SDXL / SD3 / PixArt run their batched CFG.
CALL_KWARGS = {
    "stable_diffusion": dict(height=32, width=32, num_inference_steps=2, output_type="np"),
    "stable_diffusion_xl": dict(height=32, width=32, num_inference_steps=2, output_type="np"),
    # binning would resize 16 px to PixArt's smallest aspect-ratio bucket (256 px); diffusers' tests turn it off
    # clean_caption needs bs4 and ftfy, absent here (the pipeline would warn and turn it off itself)
    "pixart_sigma": dict(height=16, width=16, num_inference_steps=2, output_type="np", use_resolution_binning=False,
                         clean_caption=False),
    "stable_diffusion_3": dict(height=32, width=32, num_inference_steps=2, output_type="np"),
    "flux": dict(height=32, width=32, num_inference_steps=2, output_type="np"),
}

CLIP_VOCAB = 512  # assets/tiny-clip-tokenizer: <|startoftext|> = 0, <|endoftext|> = 1 (also padding)


def tiny_components(family: str, seed: int = 0) -> dict:
    """The keyword arguments of the family's stock pipeline class, every model random with `seed`."""
    builders = {"stable_diffusion": tiny_sd_components, "stable_diffusion_xl": _sdxl, "pixart_sigma": _pixart_sigma,
                "stable_diffusion_3": _sd3, "flux": _flux}
    if family not in builders:
        raise ValueError(f"family={family!r} is not one of {FAMILIES}")
    components = builders[family](seed)
    for component in components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # as from_pretrained leaves them: train mode changes the images' last bits
    return components


def pipeline_class(family: str):
    import diffusers

    if family not in PIPELINES:
        raise ValueError(f"family={family!r} is not one of {FAMILIES}")
    return getattr(diffusers, PIPELINES[family])


def tiny_pipeline(family: str, seed: int = 0):
    """A stock pipeline of `family` with tiny random components in eval mode, progress bar off."""
    pipe = pipeline_class(family)(**tiny_components(family, seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(family: str, path: Path, seed: int = 0) -> Path:
    """Write a standard diffusers folder (model_index.json + one folder per component) and return it."""
    tiny_pipeline(family, seed).save_pretrained(path)
    return Path(path)


def _clip(cls_name: str, seed: int):
    import transformers

    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, projection_dim=32,
        num_attention_heads=4, num_hidden_layers=4, vocab_size=CLIP_VOCAB, max_position_embeddings=77,
        layer_norm_eps=1e-5, hidden_act="gelu",
    )
    return getattr(transformers, cls_name)(config)


def _t5(seed: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    tokenizer = T5TokenizerFast.from_pretrained(T5_TOKENIZER_DIR)
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config), tokenizer


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR)


def _vae(seed: int, **kwargs):
    """Two blocks, so vae_scale_factor = 2 (one block would make the VAE's downsampling invisible)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, **kwargs,
    )


def _flow_vae(seed: int):
    """SD3 / FLUX VAEs have no quant convs and a shift factor."""
    return _vae(seed, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def _sdxl(seed: int) -> dict:
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids x 8 + text_encoder_2's projection
        cross_attention_dim=64, norm_num_groups=8,  # the two CLIP hidden states side by side
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    return dict(unet=unet, scheduler=scheduler, vae=_vae(seed), text_encoder=_clip("CLIPTextModel", seed),
                tokenizer=_clip_tokenizer(), text_encoder_2=_clip("CLIPTextModelWithProjection", seed + 1),
                tokenizer_2=_clip_tokenizer(), image_encoder=None, feature_extractor=None, add_watermarker=False)


def _pixart_sigma(seed: int) -> dict:
    from diffusers import DDIMScheduler, PixArtTransformer2DModel

    text_encoder, tokenizer = _t5(seed)
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=text_encoder.config.d_model, in_channels=4, cross_attention_dim=24,
        out_channels=8,  # learned sigma: the pipeline keeps the first half
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )
    return dict(transformer=transformer, vae=_vae(seed), scheduler=DDIMScheduler(),
                text_encoder=text_encoder, tokenizer=tokenizer)


def _sd3(seed: int) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    text_encoder_3, tokenizer_3 = _t5(seed + 2, d_model=64)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4,
        num_layers=2,  # the last block differs (context_pre_only): keep one before it
        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
        joint_attention_dim=64,  # = T5's width = the two CLIP widths side by side
        pooled_projection_dim=64,  # the two CLIP projections side by side
    )
    return dict(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flow_vae(seed),
                text_encoder=_clip("CLIPTextModelWithProjection", seed), tokenizer=_clip_tokenizer(),
                text_encoder_2=_clip("CLIPTextModelWithProjection", seed + 1), tokenizer_2=_clip_tokenizer(),
                text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3, image_encoder=None, feature_extractor=None)


def _flux(seed: int) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    text_encoder_2, tokenizer_2 = _t5(seed + 1)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * 4,  # latents are packed 2x2 before the transformer
        num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=text_encoder_2.config.d_model, pooled_projection_dim=32,  # CLIP's pooled output
        axes_dims_rope=(4, 4, 8),  # sums to attention_head_dim
    )
    return dict(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flow_vae(seed),
                text_encoder=_clip("CLIPTextModel", seed), tokenizer=_clip_tokenizer(),
                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, image_encoder=None, feature_extractor=None)
