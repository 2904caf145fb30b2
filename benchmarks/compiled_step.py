"""What compiled steering adds to one cached decoding step, in microseconds, where a model is small
enough for it to show: a 12-layer Llama of width 64, every layer steered with Linear-AcT.

    OMP_NUM_THREADS=1 python -m benchmarks.compiled_step            # 1500 rounds
    OMP_NUM_THREADS=1 python -m benchmarks.compiled_step --rounds 300

At this width the model's own arithmetic is small, so a step is mostly the per-call cost of
Dynamo, Inductor's wrapper and transformers, and what steering adds to it (guards, graph inputs and
outputs, the eager root hooks) reads as an absolute time; on the ~134M Llama of `overhead.py` the same
microseconds are a ratio. Three compiled copies run in one process, in rotating order, each cache
cropped back after its step:

- stock, compiled as a process without steering would (`measure.compile_as_stock`);
- steered, as the library runs it;
- steered with the hook guards that attaching turns on kept during its own forwards too (what the
  library did before its steered forwards traced with torch's default, `core/hook_guards.py`).

The models run on the CPU. Writes benchmarks/results/compiled_step_cpu.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1500, help="rounds of one step of each copy")
    args = parser.parse_args()
    from transformers import CLIPTokenizer

    from benchmarks.models import TOKENIZER, lm_steering
    from dsas_diffusion.llm import attach

    torch.set_grad_enabled(False)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    stock = narrow_llama()
    steering = lm_steering(stock, CLIPTokenizer.from_pretrained(TOKENIZER))
    steered, kept = copy.deepcopy(stock), copy.deepcopy(stock)
    attach(steering, steered, strength=1.0)
    attach(steering, kept, strength=1.0)
    compile_as_stock(stock)
    steered.compile()
    own_graph_cache(kept)  # else each of the steered copies would try the other's graphs first
    kept.compile()
    copies = {"stock": torch_default_guards(stock), "steered": steered, "steered, hook guards kept": hook_guards_kept(kept)}
    ids = torch.randint(3, 512, (1, 32), generator=torch.Generator().manual_seed(1))
    times = step_times(copies, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "cpu", args.rounds,
                       warmup=20)
    result = {"rounds": args.rounds, "stock_us": statistics.median(times["stock"]) * 1e6, "cases": {}}
    for name in ("steered", "steered, hook guards kept"):
        added = [(a - b) * 1e6 for a, b in zip(times[name], times["stock"])]
        q = statistics.quantiles(added, n=4)
        result["cases"][name] = {"us": statistics.median(times[name]) * 1e6, "added_us": statistics.median(added),
                                 "added_quartiles_us": [q[0], q[2]]}
        print(f"{name:28s} +{statistics.median(added):6.0f} us per step over stock "
              f"({statistics.median(times[name]) * 1e6:.0f} us against {result['stock_us']:.0f} us; "
              f"middle half of the rounds +{q[0]:.0f} .. +{q[2]:.0f} us)")
    out = RESULTS / "compiled_step_cpu.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
