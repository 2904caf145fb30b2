"""Random-weight models of real sizes (nothing is downloaded): SD-1.5-sized UNet and CLIP text
encoder, a ~100M-parameter Llama-style LM, and small stand-ins for --quick runs."""

from __future__ import annotations

from pathlib import Path

import torch

TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tiny-clip-tokenizer"


def sd_components(full: bool, dtype=torch.float32, seed: int = 0):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    if full:  # the Stable Diffusion 1.5 UNet / VAE / CLIP ViT-L/14 text encoder configurations
        unet = UNet2DConditionModel(
            sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        text = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                              vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                              bos_token_id=0, eos_token_id=1, pad_token_id=1)
    else:  # a small stand-in with the same structure
        unet = UNet2DConditionModel(
            sample_size=16, cross_attention_dim=256, attention_head_dim=8, layers_per_block=1,
            block_out_channels=(64, 128, 128), norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
        vae = AutoencoderKL(block_out_channels=(32, 64), latent_channels=4, norm_num_groups=32,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
        text = CLIPTextConfig(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_hidden_layers=6,
                              vocab_size=512, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    if dtype != torch.float32:
        unet, vae = unet.to(dtype), vae.to(dtype)
    comps = dict(unet=unet.eval(), vae=vae.eval(), text_encoder=CLIPTextModel(text).to(dtype).eval(),
                 tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER), scheduler=scheduler, safety_checker=None,
                 feature_extractor=None, requires_safety_checker=False)
    return comps


def llama(full: bool, dtype=torch.float32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if full:  # ~134M parameters
        cfg = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                          num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
    else:
        cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=2048, max_position_embeddings=512)
    cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = 0, 1, 2
    return LlamaForCausalLM(cfg).to(dtype).eval()


def prompts(n: int, concept: str | None, seed: int = 0) -> list[str]:
    """Templated prompts over the tiny tokenizer's vocabulary; with `concept` in every one of them."""
    import random

    rng = random.Random(seed)
    things = ["dog", "cat", "car", "house", "tree", "bird", "horse", "boat", "flower", "man", "woman", "train"]
    places = ["table", "beach", "street", "field", "garden", "park", "city", "forest", "sea", "road", "kitchen"]
    adjs = ["red", "blue", "small", "big", "old", "cute", "bright", "dark", "wooden", "golden"]
    out = []
    for _ in range(n):
        thing = concept or rng.choice(things)
        out.append(f"a photo of a {rng.choice(adjs)} {thing} in the {rng.choice(places)}, {rng.choice(adjs)} style")
    return out


def pipe_steering(pipe, size: int, n: int = 8):
    """The benchmarks' concept ("banana" -> "apple"), fitted on every UNet and text-encoder layer."""
    return pipe.fit_steering(prompts(n, "banana"), prompts(n, "apple"), prompts(n, None, seed=1), method="linear_act",
                             num_inference_steps=1, height=size, width=size, accuracy_threshold=0.0, progress=False)


def lm_steering(model, tokenizer, n: int = 16):
    """The same concept on a language model, every layer steered."""
    from dsas_diffusion.llm import fit_steering

    return fit_steering(model, tokenizer, source=prompts(n, "banana"), target=prompts(n, "apple"),
                        control=prompts(n, None, seed=1), method="linear_act", accuracy_threshold=0.0, progress=False)
