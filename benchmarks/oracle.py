"""Bit-identity against stock diffusers / transformers on any device, with the benchmark's models.

    python -m benchmarks.oracle --device cuda

The test suite proves it on the CPU; this runs the same oracle where kernels differ (CUDA, half
precision). Prints one line per check and exits non-zero if any output differs by a single bit.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .models import TOKENIZER, llama, lm_steering, pipe_steering, sd_components


def diffusion_checks(device: str, dtype, size: int, steps: int) -> dict[str, bool]:
    from diffusers import StableDiffusionPipeline

    from dsas_diffusion import DSASStableDiffusionPipeline

    comps = sd_components(full=False, dtype=dtype)
    stock = StableDiffusionPipeline(**comps).to(device)
    pipe = DSASStableDiffusionPipeline(**comps).to(device)
    for p in (stock, pipe):
        p.set_progress_bar_config(disable=True)
    steering = pipe_steering(pipe, size)
    kw = dict(num_inference_steps=steps, height=size, width=size, output_type="np")
    prompt = "a photo of a red banana in the kitchen"

    def run(p, **extra):
        return p(prompt, generator=torch.Generator(device).manual_seed(0), **kw, **extra).images

    base = run(stock)
    pipe.set_steering(None)
    off = run(pipe)
    pipe.set_steering(steering)
    zero = run(pipe, steering_strength=0.0)
    steered = run(pipe)
    return {"diffusion, steering off": (off == base).all(), "diffusion, strength 0": (zero == base).all(),
            "diffusion, steering changes the image": not (steered == base).all()}


def llm_checks(device: str, dtype) -> dict[str, bool]:
    from transformers import CLIPTokenizer

    from dsas_diffusion.llm import attach

    model = llama(full=False, dtype=dtype).to(device)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
    steering = lm_steering(model, tokenizer)
    ids = torch.randint(3, 512, (4, 24), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row

    def run():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True)
        return out.sequences, torch.stack(out.logits, 1)

    base = run()
    with attach(steering, model, strength=0.0):
        zero = run()
    with attach(steering, model, strength=4.0):
        steered = run()
    after = run()
    same = [torch.equal(a, b) for a, b in zip(zero + after, base + base)]
    return {"llm, strength 0": all(same[:2]), "llm, detached": all(same[2:]),
            "llm, steering changes the logits": not torch.equal(steered[1], base[1])}


def main(argv=None) -> int:
    from dsas_diffusion.cli import arguments as types

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=types.device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype or ("float16" if args.device.startswith("cuda") else "float32"))
    torch.set_grad_enabled(False)
    checks = {**diffusion_checks(args.device, dtype, size=64, steps=3), **llm_checks(args.device, dtype)}
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name} ({args.device}, {dtype})")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
