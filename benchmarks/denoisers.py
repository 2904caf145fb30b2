"""Random-weight SDXL-sized and FLUX-sized pipelines for the overhead benchmark (nothing is downloaded).

    pipe = pipeline("stable_diffusion_xl", full=True, device="cuda", dtype=torch.float16)   # real sizes
    pipe = pipeline("flux", full=False)                      # the same structure, small, for CPU runs
    steering = steering_for(pipe, SIZES["flux"][False])      # every denoiser and text-encoder layer

Full size: the SDXL base UNet (2.6B parameters) with CLIP ViT-L and OpenCLIP bigG text encoders, and
the FLUX.1 transformer (12B: 19 dual-stream and 38 single-stream blocks) with CLIP ViT-L and T5-XXL
(4.7B), so build them with `device="cuda"` (initialised there, in `dtype`) and bf16 / fp16. The
reduced versions keep each family's structure (two text encoders, SDXL's text-time embedding, FLUX's
packed latents, joint blocks and 8x VAE) at widths a CPU runs in seconds; use them at `SIZES[...][False]`
pixels and a few steps. Weights are random: the cost of steering does not depend on their values.
"""

from __future__ import annotations

from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SIZES = {"stable_diffusion_xl": {True: 1024, False: 128}, "flux": {True: 1024, False: 128}}  # pixels a side


def _clip(cls_name: str, full_width: int | None, *, layers: int, heads: int, projection: int | None = None):
    import transformers

    width = full_width or 64
    config = transformers.CLIPTextConfig(
        hidden_size=width, intermediate_size=4 * width, num_attention_heads=heads, num_hidden_layers=layers,
        projection_dim=projection or width, vocab_size=49408 if full_width else 512, max_position_embeddings=77,
        hidden_act="gelu" if full_width and full_width > 768 else "quick_gelu", bos_token_id=0, eos_token_id=1,
        pad_token_id=1)
    return getattr(transformers, cls_name)(config)


def _vae(full: bool, latent_channels: int, **kwargs):
    from diffusers import AutoencoderKL

    channels = (128, 256, 512, 512) if full else (16, 32, 32, 32)  # four blocks: the real 8x downsampling
    return AutoencoderKL(block_out_channels=channels, latent_channels=latent_channels,
                         norm_num_groups=32 if full else 8, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, **kwargs)


def sdxl_components(full: bool) -> dict:
    """SDXL base: UNet, CLIP ViT-L/14 (`text_encoder`) and OpenCLIP ViT-bigG/14 (`text_encoder_2`)."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    if full:
        te1 = _clip("CLIPTextModel", 768, layers=12, heads=12)
        te2 = _clip("CLIPTextModelWithProjection", 1280, layers=32, heads=20, projection=1280)
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    else:
        te1 = _clip("CLIPTextModel", None, layers=4, heads=4)
        te2 = _clip("CLIPTextModelWithProjection", None, layers=4, heads=4)
        unet = UNet2DConditionModel(
            sample_size=16, block_out_channels=(32, 64, 128), layers_per_block=2,
            transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 8), cross_attention_dim=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
            norm_num_groups=16, addition_embed_type="text_time", addition_time_embed_dim=16,
            projection_class_embeddings_input_dim=6 * 16 + 64)
    tokenizer = CLIPTokenizer.from_pretrained(ASSETS / "tiny-clip-tokenizer")
    with torch.device("cpu"):  # schedulers keep their tables on the CPU
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           steps_offset=1, timestep_spacing="leading")
    return dict(unet=unet, vae=_vae(full, 4, scaling_factor=0.13025), text_encoder=te1, tokenizer=tokenizer,
                text_encoder_2=te2, tokenizer_2=tokenizer, scheduler=scheduler, image_encoder=None,
                feature_extractor=None, add_watermarker=False)


def flux_components(full: bool) -> dict:
    """FLUX.1-dev: the transformer, CLIP ViT-L/14 (pooled) and T5-XXL (`text_encoder_2`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    t5_tokenizer = T5TokenizerFast.from_pretrained(ASSETS / "tiny-t5-tokenizer")
    if full:
        clip = _clip("CLIPTextModel", 768, layers=12, heads=12)
        t5 = T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
                      feed_forward_proj="gated-gelu")
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))
    else:
        clip = _clip("CLIPTextModel", None, layers=4, heads=4)
        t5 = T5Config(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, vocab_size=len(t5_tokenizer),
                      feed_forward_proj="gated-gelu")
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=32,
            num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=True,
            axes_dims_rope=(8, 12, 12))
    t5.pad_token_id, t5.eos_token_id, t5.decoder_start_token_id = 0, 1, 0
    vae = _vae(full, 16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
    with torch.device("cpu"):  # schedulers keep their tables on the CPU
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    return dict(transformer=transformer, vae=vae, text_encoder=clip,
                tokenizer=CLIPTokenizer.from_pretrained(ASSETS / "tiny-clip-tokenizer"),
                text_encoder_2=T5EncoderModel(t5), tokenizer_2=t5_tokenizer,
                scheduler=scheduler,
                image_encoder=None, feature_extractor=None)


def pipeline(family: str, full: bool, *, device: str = "cpu", dtype=torch.float32, seed: int = 0):
    """A stock pipeline of `family` ("stable_diffusion_xl" or "flux"), every model random with `seed`,
    initialised directly on `device` in `dtype` (a full FLUX is 17B parameters)."""
    from diffusers import FluxPipeline, StableDiffusionXLPipeline

    builders = {"stable_diffusion_xl": (sdxl_components, StableDiffusionXLPipeline),
                "flux": (flux_components, FluxPipeline)}
    if family not in builders:
        raise ValueError(f"family={family!r}: choose one of {sorted(builders)}")
    build, cls = builders[family]
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            components = build(full)
    finally:
        torch.set_default_dtype(default)
    for component in components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def steering_for(pipe, size: int, n: int = 8):
    """The benchmarks' concept ("banana" -> "apple") fitted on every text-encoder and default denoiser layer
    of any supported pipeline, stock or named."""
    from dsas_diffusion import fit_pipeline_steering

    from .models import prompts

    return fit_pipeline_steering(pipe, prompts(n, "banana"), prompts(n, "apple"), prompts(n, None, seed=1),
                                 method="linear_act", num_inference_steps=1, height=size, width=size,
                                 accuracy_threshold=0.0, progress=False)
