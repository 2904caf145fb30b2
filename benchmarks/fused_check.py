"""The fused steering op against its composite reference on random inputs of every map form, gating mode,
mask combination and dtype.

    python -m benchmarks.fused_check --device cuda          # the Triton kernel (GPU)
    python -m benchmarks.fused_check --device cpu           # the CPU path: bit for bit
    TRITON_INTERPRET=1 python -m benchmarks.fused_check --interpret   # the kernel in Triton's CPU interpreter

Prints one line per (dtype, map, gating) with the largest error of each output, relative to that
output's largest magnitude, against the dtype's tolerance (0 on the CPU, where the op IS the
composite), and exits non-zero if any case fails. bfloat16 runs the clamped affine map only (the
form with every term), which bounds the kernel variants Triton compiles on a GPU. On CUDA it also
times the kernel, as eager steering calls it, against the composite, in float16.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from dsas_diffusion.core import fused
from dsas_diffusion.core.fused import MapTerms, composite, op_args
from dsas_diffusion.core.runtime import positions

# rounding of the logits and of the map to the dtype allows a few units in the last place; float32 agrees to 1e-6
TOLERANCE = {torch.float32: 1e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}
MAPS = ("shift", "affine clamped", "affine inside", "affine to infinity", "affine unclamped", "shift per row")


def terms(name: str, b: int, d: int, g: torch.Generator) -> MapTerms:
    shift, slope = torch.randn(d, generator=g), 0.5 * torch.randn(d, generator=g)
    lo = -0.5 - torch.rand(d, generator=g)
    if name == "shift":
        return MapTerms(shift)
    if name == "shift per row":  # a spatial mean transported (spatial_map="spatial_mean"): one shift per row
        return MapTerms(torch.randn(b, 1, d, generator=g))
    if name == "affine clamped":
        return MapTerms(shift, slope, lo, lo + 1.5)
    if name == "affine inside":  # Linear-AcT with outside_source_range="identity"
        return MapTerms(shift, slope, lo, lo + 1.5, True)
    if name == "affine to infinity":  # Linear-AcT fitted with clamp_to_source_range=False
        return MapTerms(shift, slope, torch.full((d,), -torch.inf), torch.full((d,), torch.inf))
    return MapTerms(shift, slope)  # LinEAS's form: no range


def situations(small: bool, gpu: bool, g: torch.Generator):
    """(name, x (B, K, D) float32, kind, positions() arguments, prior mean): each path of the kernel."""
    d = 12 if small else 320
    ks = (3, 20) if small else (24, 77, 300)
    sides = (4,) if small else (16, 72) if gpu else (16,)  # 72 x 72: a row of logits longer than one block
    for b in (1, 3):
        counts = torch.randint(1, 9, (b, 1, 1), generator=g).float()
        means = torch.randn(b, 1, 1, generator=g)
        new_valid = torch.ones(b, 1, dtype=torch.bool)
        new_valid[-1] = b == 1
        yield f"decode B={b}", torch.randn(b, 1, d, generator=g), "tokens", dict(
            valid=new_valid, prior_count=counts, starts=False), means
        yield f"chunk after cache B={b}", torch.randn(b, 6, d, generator=g), "tokens", dict(
            prior_count=counts, starts=False), means
        for k in ks:
            valid = torch.ones(b, k, dtype=torch.bool)
            valid[-1, : k // 3] = b == 1
            rows = (torch.arange(b) != 1).float()
            yield f"prefill K={k} B={b}", torch.randn(b, k, d, generator=g), "tokens", dict(
                valid=valid, skip_first=True, rows=rows), None
        for side in sides:
            image = torch.randn(b, d, side, side, generator=g)  # (B, C, H, W) read as (B, H*W, C): strided
            yield f"spatial {side}x{side} B={b}", image.flatten(2).transpose(1, 2), "spatial", dict(
                rows=(torch.arange(b) != 1).float()), None


def error(a: torch.Tensor, e: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest magnitude (at least 1)."""
    e = e.expand_as(a).double()
    return ((a.double() - e).abs().max() / e.abs().max().clamp_min(1)).item()


def median_ms(fn, n: int = 50) -> float:
    """Median wall time of one call, synchronised: launch overhead included, as eager inference pays it."""
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--interpret", action="store_true",
                        help="run the Triton kernel on the CPU in Triton's interpreter (needs TRITON_INTERPRET=1)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16"],
                        choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--maps", nargs="+", default=list(MAPS), choices=MAPS)
    args = parser.parse_args(argv)
    if args.interpret and (os.environ.get("TRITON_INTERPRET") != "1" or fused.triton is None):
        parser.error("--interpret needs Triton installed and TRITON_INTERPRET=1 set before Python starts")
    device = "cpu" if args.interpret else args.device
    if args.interpret:  # tiny tiles, so that every loop of the kernel runs more than once on small inputs
        fused._TILE, fused._MAX_BLOCK_K, fused._ROW = 16, 4, 8
    op = fused.triton_steer if args.interpret else torch.ops.dsas.steer_layer
    timing = device.startswith("cuda") and fused.triton is not None
    if device.startswith("cuda") and not timing:
        print("Triton is not installed: on CUDA the op runs the composite, so this checks the composite only")
    exact = device == "cpu" and not args.interpret
    torch.set_grad_enabled(False)
    g = torch.Generator().manual_seed(0)
    failed, timed = 0, {}
    for dtype in (getattr(torch, name) for name in args.dtypes):
        tol = 0.0 if exact else TOLERANCE[dtype]
        for map_name in args.maps if dtype != torch.bfloat16 else [m for m in args.maps if m == "affine clamped"]:
            for gating in ("token", "sequence", "causal"):
                worst = {}
                for activation in ("sigmoid", "relu"):
                    for name, x, kind, kw, prior_mean in situations(args.interpret, device.startswith("cuda"), g):
                        b, k, d = x.shape
                        t = terms(map_name, b, d, g)
                        cast = [v.to(device, dtype) if isinstance(v, torch.Tensor) else v for v in t]
                        w = (torch.randn(1, d, generator=g) / d ** 0.5).to(device)  # the gate is float32
                        bias = torch.randn(1, generator=g).to(device)
                        kw = {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in kw.items()}
                        pos = positions(b, k, device, gating=gating, kind=kind, **kw)
                        floor = 0.3 if dtype == torch.float32 else 0.0  # a half-precision lambda may cross it
                        on = device if activation == "relu" else "cpu"  # strength read on the device or the host
                        args_ = op_args(x.to(device, dtype), w, bias, torch.tensor(1.5, device=on), MapTerms(*cast),
                                        pos, gating=gating, kind=kind, floor=floor, activation=activation,
                                        prior_mean=None if prior_mean is None else prior_mean.to(device))
                        got, want = op(*args_), composite(*args_)
                        if got[0].stride() != args_[0].stride():
                            worst["strides"] = float("inf")
                        for part, a, e in zip(("out", "lam", "mean", "proj"), got, want):
                            worst[part] = max(worst.get(part, 0.0), error(a, e))
                        timed_case = map_name == "affine clamped" and activation == "sigmoid"
                        if timing and dtype == torch.float16 and timed_case:
                            key = f"{name}, {dtype}, {gating}"
                            timed[key] = (median_ms(lambda: fused.triton_steer(*args_)),
                                          median_ms(lambda: composite(*args_)))
                ok = all(v <= tol for v in worst.values())
                failed += not ok
                detail = ", ".join(f"{p} {v:.1e}" for p, v in worst.items())
                print(f"{'ok  ' if ok else 'FAIL'} {dtype}, {map_name}, {gating}: {detail} (tolerance {tol:.0e})")
    for key, (kernel_ms, composite_ms) in timed.items():
        print(f"time {key}: kernel {kernel_ms:.3f} ms, composite {composite_ms:.3f} ms")
    where = "Triton interpreter" if args.interpret else device
    print(f"{'all ok' if not failed else f'{failed} FAILED'} ({where})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
