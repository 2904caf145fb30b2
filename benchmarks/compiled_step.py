"""What compiled steering adds to one cached decoding step, in microseconds, where a model is small
enough for it to show: a 12-layer Llama of width 64, every layer steered with Linear-AcT.

    OMP_NUM_THREADS=1 python -m benchmarks.compiled_step            # 1500 rounds
    OMP_NUM_THREADS=1 python -m benchmarks.compiled_step --rounds 300
    OMP_NUM_THREADS=1 python -m benchmarks.compiled_step --phases   # and where the added time goes

At this width the model's own arithmetic is small, so a step is mostly the per-call cost of
Dynamo, Inductor's wrapper and transformers, and what steering adds to it (guards, graph inputs and
outputs, the eager root hooks) reads as an absolute time; on the ~134M Llama of `overhead.py` the same
microseconds are a ratio. Three compiled copies (five with `--phases`) run in one process, in
rotating order, each cache cropped back after its step:

- stock, compiled as a process without steering would (`measure.compile_as_stock`);
- steered, as the library runs it;
- steered with the hook guards that attaching turns on kept during its own forwards too (what the
  library did before its steered forwards traced with torch's default, `core/hook_guards.py`).

`--phases` adds two copies compiled through a timed backend, one steered and one at strength 0 (the
same hooks and eager work, nothing steered in the graph), and splits each of their steps at the
library's root hooks and at the compiled graph: where the added time goes (`PhaseClock`). Its
timestamps are taken in every steered copy's hooks, which adds about a microsecond to each.

The models run on the CPU. Writes benchmarks/results/compiled_step_cpu.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.llm_overhead import step_times
from benchmarks.measure import compile_as_stock, own_graph_cache, torch_default_guards

RESULTS = Path(__file__).parent / "results"


def narrow_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=12, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=2048, max_position_embeddings=512)
    cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = 0, 1, 2
    return LlamaForCausalLM(cfg).eval()


def hook_guards_kept(model):
    """`model`, its forwards run without the switch to torch's default hook guards."""
    from dsas_diffusion.core import hooks

    def run(*args, **kwargs):
        enter, leave = hooks.enter_steered_forward, hooks.leave_steered_forward
        hooks.enter_steered_forward = hooks.leave_steered_forward = lambda: None
        try:
            return model(*args, **kwargs)
        finally:
            hooks.enter_steered_forward, hooks.leave_steered_forward = enter, leave
    return run


PHASES = ("root pre-hooks", "guards and graph inputs", "graph", "after the graph", "rest")


class PhaseClock:
    """Splits a compiled steered step at the library's root hooks and at the graph's call (its Inductor
    callable, AOT wrappers included):

    - root pre-hooks: the steering's eager pre-hooks (masks, positions, the causal LM's `pre_forward`);
    - guards and graph inputs: from there to the graph's start: Dynamo's guard check, the bytecode that
      loads the graph's inputs, and the Python frames on the way (the model's wrappers);
    - graph: the compiled graph;
    - after the graph: until the root post-hook has filed the lambdas: Dynamo's replay of side effects
      (the running state, recorded lambdas), building the model's output, and that filing;
    - rest: the call into the model and the way out."""

    def __init__(self):
        from dsas_diffusion.core import hooks, runtime

        self.marks: dict[str, float] = {}
        mark = self.marks.__setitem__
        enter, leave = hooks.enter_steered_forward, hooks.leave_steered_forward
        begin = runtime.SteeringHandle._begin_call

        def entered():
            mark("enter", time.perf_counter())
            enter()

        def left():
            mark("leave", time.perf_counter())
            leave()

        def begun(handle, args, kwargs):
            begin(handle, args, kwargs)
            mark("begun", time.perf_counter())

        hooks.enter_steered_forward, hooks.leave_steered_forward = entered, left
        runtime.SteeringHandle._begin_call = begun

    def backend(self):
        """Inductor, its compiled callable timed."""
        from torch._dynamo.backends.inductor import inductor
        mark = self.marks.__setitem__

        def timed_inductor(gm, example_inputs, **kwargs):
            compiled = inductor(gm, example_inputs, **kwargs)

            def run(*args):
                mark("graph", time.perf_counter())
                out = compiled(*args)
                mark("graphed", time.perf_counter())
                return out
            return run
        return timed_inductor

    def timed(self, model, into: list):
        """`model`, each call's phases (seconds, in `PHASES` order) appended to `into`."""
        def run(*args, **kwargs):
            m = self.marks
            m.clear()
            start = time.perf_counter()
            out = model(*args, **kwargs)
            total = time.perf_counter() - start
            parts = [m["begun"] - m["enter"], m["graph"] - m["begun"], m["graphed"] - m["graph"],
                     m["leave"] - m["graphed"]]
            into.append((*parts, total - sum(parts)))
            return out
        return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1500, help="rounds of one step of each copy")
    parser.add_argument("--phases", action="store_true", help="split the steered steps into phases (see PhaseClock)")
    args = parser.parse_args()
    from transformers import CLIPTokenizer

    from benchmarks.models import TOKENIZER, lm_steering
    from dsas_diffusion.llm import attach

    torch.set_grad_enabled(False)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    stock = narrow_llama()
    steering = lm_steering(stock, CLIPTokenizer.from_pretrained(TOKENIZER))
    clock = PhaseClock() if args.phases else None

    def compiled_copy(strength: float, backend="inductor"):
        """A copy of the stock model, steered, compiled with graphs of its own (else each copy would try
        the others' graphs first). Made before the stock model is compiled, never copied from it."""
        model = copy.deepcopy(stock)
        attach(steering, model, strength=strength)
        own_graph_cache(model)
        model.compile(backend=backend)
        return model

    copies = {"steered": compiled_copy(1.0), "steered, hook guards kept": hook_guards_kept(compiled_copy(1.0))}
    phases = {}
    if clock is not None:
        # a steered copy again and one at strength 0, through the clock's backend: the plain one stays as it was
        phases = {"steered (phases)": [], "strength 0 (phases)": []}
        copies["steered (phases)"] = clock.timed(compiled_copy(1.0, clock.backend()), phases["steered (phases)"])
        copies["strength 0 (phases)"] = clock.timed(compiled_copy(0.0, clock.backend()), phases["strength 0 (phases)"])
    compile_as_stock(stock)
    copies = {"stock": torch_default_guards(stock), **copies}
    ids = torch.randint(3, 512, (1, 32), generator=torch.Generator().manual_seed(1))
    times = step_times(copies, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "cpu", args.rounds,
                       warmup=20)
    result = {"rounds": args.rounds, "stock_us": statistics.median(times["stock"]) * 1e6, "cases": {}}
    for name in ("steered", "steered, hook guards kept", *phases):
        added = [(a - b) * 1e6 for a, b in zip(times[name], times["stock"])]
        q = statistics.quantiles(added, n=4)
        result["cases"][name] = {"us": statistics.median(times[name]) * 1e6, "added_us": statistics.median(added),
                                 "added_quartiles_us": [q[0], q[2]]}
        print(f"{name:28s} +{statistics.median(added):6.0f} us per step over stock "
              f"({statistics.median(times[name]) * 1e6:.0f} us against {result['stock_us']:.0f} us; "
              f"middle half of the rounds +{q[0]:.0f} .. +{q[2]:.0f} us)")
    if phases:
        print("\nphases of a step (PhaseClock), median us:")
        print(f"{'':24s}" + "".join(f"{p:>25s}" for p in PHASES))
        timed = {name: rows[-args.rounds:] for name, rows in phases.items()}  # the warm-up's left out
        timed["steered minus strength 0"] = [[a - b for a, b in zip(*rows)]
                                             for rows in zip(timed["steered (phases)"], timed["strength 0 (phases)"])]
        result["phases_us"] = {name: {p: statistics.median(r[i] for r in rows) * 1e6 for i, p in enumerate(PHASES)}
                               for name, rows in timed.items()}
        for name, medians in result["phases_us"].items():
            sign = "+" if name == "steered minus strength 0" else ""
            print(f"{name:24s}" + "".join(f"{medians[p]:{sign}25.0f}" for p in PHASES))
    out = RESULTS / "compiled_step_cpu.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
