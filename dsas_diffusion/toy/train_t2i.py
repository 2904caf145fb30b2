"""Train the toy text-to-image world's Stable-Diffusion-layout model on CPU, from a fixed seed.

    python -m dsas_diffusion.toy.train_t2i --out assets/toy-t2i

1. a tiny AutoencoderKL (32x32x3 <-> 8x8x4) on the world's images;
2. a small UNet2DConditionModel and a tiny CLIP text encoder, jointly, on noised latents with
   their captions (10 % empty captions, so classifier-free guidance works);
3. saved with the stock `StableDiffusionPipeline.save_pretrained`: a standard diffusers folder.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .t2i_world import dataset

TOKENIZER = Path(__file__).resolve().parents[2] / "assets" / "tiny-clip-tokenizer"


def build_components(seed: int = 0) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(32, 64, 64), in_channels=3, out_channels=3, latent_channels=4,
                        layers_per_block=1, norm_num_groups=16, sample_size=32,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), norm_num_groups=16, cross_attention_dim=64,
                                attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                                num_attention_heads=4, vocab_size=512, max_position_embeddings=77,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    # captions are ~10 tokens: padding them to 16, not 77, makes every cross-attention 5x cheaper
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER, model_max_length=16)
    return dict(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _cosine(step: int, total: int, warmup: int = 50) -> float:
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))


def train_vae(vae, images: torch.Tensor, steps: int, batch: int = 32, lr: float = 2e-3, seed: int = 0) -> float:
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps))
    g = torch.Generator().manual_seed(seed)
    vae.train()
    for _ in (bar := tqdm(range(steps), desc="vae")):
        x = images[torch.randint(len(images), (batch,), generator=g)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    return loss.item()


def train_denoiser(unet, text_encoder, tokenizer, latents, captions, steps: int, batch: int = 64, lr: float = 1e-3,
                   drop: float = 0.1, seed: int = 0) -> float:
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps))
    g = torch.Generator().manual_seed(seed)
    unet.train()
    text_encoder.train()
    for _ in (bar := tqdm(range(steps), desc="unet + text encoder")):
        idx = torch.randint(len(latents), (batch,), generator=g)
        z0 = latents[idx]
        tok = ids[idx].clone()
        tok[torch.rand(batch, generator=g) < drop] = empty[0]
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,), generator=g)
        zt = noise_sched.add_noise(z0, noise, t)
        pred = unet(zt, t, encoder_hidden_states=text_encoder(tok)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    unet.eval()
    text_encoder.eval()
    return loss.item()


def main(argv=None):
    from ..cli import arguments as types

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=types.output_folder, default="assets/toy-t2i")
    parser.add_argument("--seed", type=types.seed, default=0)
    parser.add_argument("--images", type=types.positive_int, default=72 * 40)
    parser.add_argument("--vae-steps", type=types.positive_int, default=800)
    parser.add_argument("--unet-steps", type=types.positive_int, default=3000)
    parser.add_argument("--threads", type=types.threads, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(args.seed)
    start = time.time()
    comps = build_components(args.seed)
    images_np, captions = dataset(args.images, seed=args.seed)
    images = _to_tensor(images_np)
    vae_loss = train_vae(comps["vae"], images, args.vae_steps, seed=args.seed)
    with torch.no_grad():
        latents = torch.cat([comps["vae"].encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    scale = float(1 / latents.std())
    comps["vae"].register_to_config(scaling_factor=scale)
    unet_loss = train_denoiser(comps["unet"], comps["text_encoder"], comps["tokenizer"], latents * scale, captions,
                               args.unet_steps, seed=args.seed)
    pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(args.out)
    print(f"vae loss {vae_loss:.4f}, denoiser loss {unet_loss:.4f}, latent scale {scale:.3f}, "
          f"{time.time() - start:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
