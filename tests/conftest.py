"""Tiny, seeded, offline models shared by the tests. Nothing here touches a hub."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TOKENIZER_DIR = ASSETS / "tiny-clip-tokenizer"

CONCEPT_SOURCE = [f"a photo of a banana on a {place}" for place in ("table", "plate", "beach", "street", "field", "bowl")] + [
    f"a {adj} banana in the {place}" for adj, place in (("yellow", "kitchen"), ("small", "garden"), ("big", "park"),
                                                        ("old", "city"), ("bright", "forest"), ("cute", "sea"))]
CONCEPT_TARGET = [p.replace("banana", "apple") for p in CONCEPT_SOURCE]
CONCEPT_CONTROL = [f"a photo of a {thing} on a {place}" for thing, place in (
    ("dog", "table"), ("cat", "plate"), ("car", "beach"), ("house", "street"), ("tree", "field"), ("bird", "bowl"))] + [
    f"a {adj} {thing} in the {place}" for adj, thing, place in (
        ("yellow", "flower", "kitchen"), ("small", "horse", "garden"), ("big", "boat", "park"),
        ("old", "man", "city"), ("bright", "star", "forest"), ("cute", "fish", "sea"))]


def one_torch_thread():
    """A package-wide autouse fixture for conftests of test folders of tiny models: on a shared 2-core
    machine two OpenMP threads fighting other processes for the cores make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_sd_components(seed: int = 0, text_hidden: int = 32, vocab_size: int = 512):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_hidden, norm_num_groups=8, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=text_hidden, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=4, vocab_size=vocab_size, max_position_embeddings=77,
        layer_norm_eps=1e-5,
    )).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
                scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_stock_pipeline(path: Path, **kwargs) -> Path:
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline(**tiny_sd_components(**kwargs)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory) -> Path:
    """A standard Stable Diffusion folder, written by stock diffusers."""
    return save_stock_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture
def dsas_pipe(sd_dir):
    from dsas_diffusion import DSASStableDiffusionPipeline

    pipe = DSASStableDiffusionPipeline.from_pretrained(sd_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def fitted_steering(sd_dir):
    from dsas_diffusion import DSASStableDiffusionPipeline

    pipe = DSASStableDiffusionPipeline.from_pretrained(sd_dir)
    return pipe.fit_steering(CONCEPT_SOURCE, CONCEPT_TARGET, CONCEPT_CONTROL, method="mean_shift",
                             num_inference_steps=3, progress=False)
