"""Train the toy text-to-image world's PixArt-Σ-layout model on CPU, from a fixed seed.

    python -m dsas_diffusion.toy.train_dit --out assets/toy-dit

1. the UNet world's trained VAE (assets/toy-t2i/vae, 32x32x3 <-> 8x8x4) is reused as it is;
2. a small PixArtTransformer2DModel and a tiny T5 encoder (whose tokenizer has one piece per word
   of the world's captions) are trained jointly on noised latents with captions in every phrasing
   of `t2i_world.phrasings` (10 % empty captions, so classifier-free guidance works);
3. saved with the stock `PixArtSigmaPipeline.save_pretrained`: a standard diffusers folder, loaded
   by `DSASPixArtSigmaPipeline.from_pretrained`. Call it with CALL_KWARGS: the latent grid (8x8)
   has no resolution bin, and captions fit in MAX_TOKENS tokens (the pipeline pads to 300); and
   guidance_scale=GUIDANCE.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .t2i_world import dataset, dit_vocabulary, parse, phrasings
from .train_t2i import _cosine, _to_tensor

ASSETS = Path(__file__).resolve().parents[2] / "assets"
MAX_TOKENS = 16  # the longest caption is 12 tokens with its </s>
# what every call of the DiT world's pipeline passes (fitting: as pipeline_kwargs)
CALL_KWARGS = dict(use_resolution_binning=False, clean_caption=False, max_sequence_length=MAX_TOKENS)
# measured on the shipped model, 72 scenes x 2 seeds, 20 steps: colour right 0.79 / 0.90 / 0.71 at guidance 1 / 2 / 7
GUIDANCE = 2.0


def build_tokenizer():
    """A T5 unigram tokenizer with one piece per word of the world (ids: <pad> 0, </s> 1, <unk> 2)."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -5.0)]
    vocab += [("\u2581" + w, -1.0) for w in dit_vocabulary()]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=MAX_TOKENS)


def build_components(seed: int = 0, vae_path: Path = ASSETS / "toy-t2i" / "vae") -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=3,
                                           num_heads=4, relative_attention_num_buckets=8,
                                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                           decoder_start_token_id=tokenizer.pad_token_id))
    transformer = PixArtTransformer2DModel(sample_size=8, num_layers=4, patch_size=2, attention_head_dim=16,
                                           num_attention_heads=4, caption_channels=64, in_channels=4, out_channels=4,
                                           cross_attention_dim=64, attention_bias=True,
                                           activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                           norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    vae = AutoencoderKL.from_pretrained(vae_path).eval().requires_grad_(False)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler)


def train_denoiser(transformer, text_encoder, tokenizer, latents, captions, steps: int, batch: int = 64,
                   lr: float = 1e-3, drop: float = 0.1, seed: int = 0) -> float:
    """Epsilon prediction on DDPM-noised latents; each sample's caption drawn among its phrasings."""
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps))
    g = torch.Generator().manual_seed(seed)
    pick = random.Random(seed)
    transformer.train()
    text_encoder.train()
    for _ in (bar := tqdm(range(steps), desc="transformer + text encoder")):
        idx = torch.randint(len(latents), (batch,), generator=g)
        keep = torch.rand(batch, generator=g) >= drop
        texts = [pick.choice(captions[i]) if k else "" for i, k in zip(idx.tolist(), keep.tolist())]
        tok = tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
        z0 = latents[idx]
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,), generator=g)
        zt = noise_sched.add_noise(z0, noise, t)
        text = text_encoder(tok.input_ids, attention_mask=tok.attention_mask)[0]
        pred = transformer(zt, encoder_hidden_states=text, encoder_attention_mask=tok.attention_mask, timestep=t,
                           added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    transformer.eval()
    text_encoder.eval()
    return loss.item()


def main(argv=None):
    from ..cli import arguments as types

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=types.output_folder, default="assets/toy-dit")
    parser.add_argument("--seed", type=types.seed, default=0)
    parser.add_argument("--images", type=types.positive_int, default=72 * 40)
    parser.add_argument("--steps", type=types.positive_int, default=3000)
    parser.add_argument("--batch", type=types.positive_int, default=64)
    parser.add_argument("--threads", type=types.threads, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import PixArtSigmaPipeline

    start = time.time()
    comps = build_components(args.seed)
    images_np, plain = dataset(args.images, seed=args.seed)  # the UNet world's images, jitter and all
    captions = [phrasings(parse(c)) for c in plain]
    vae = comps["vae"]
    with torch.no_grad():
        images = _to_tensor(images_np)
        latents = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    loss = train_denoiser(comps["transformer"], comps["text_encoder"], comps["tokenizer"],
                          latents * vae.config.scaling_factor, captions, args.steps, batch=args.batch, seed=args.seed)
    PixArtSigmaPipeline(**comps).save_pretrained(args.out)
    print(f"denoiser loss {loss:.4f}, {time.time() - start:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
