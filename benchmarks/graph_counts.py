"""Graphs and graph breaks torch.compile builds for a steered model against the stock one, on every
model family the test suite builds tiny (random weights, CPU, Dynamo with a counting backend):

    python -m benchmarks.graph_counts                 # every family, about 14 minutes on 2 CPU cores
    python -m benchmarks.graph_counts --only llm gpt2 openai-gpt

- language models: `generate()` over 3 batch sizes (other prompt lengths) and 2 strengths;
- pipelines: the denoiser, over 2-step calls at three resolutions and with 1, 2 and 3 images per prompt.

A steered model may build one graph more than stock and no graph break (issue 16's bar). Dynamo makes
a size dynamic once it changes, so neither side should build a graph per shape. Writes
benchmarks/results/graph_counts.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def lm_counts(family: str) -> dict:
    from tests.graph_counts import generate_graphs

    return {side: (seen.graphs, sum(seen.breaks.values()))
            for side, seen in (("stock", generate_graphs(family, False)), ("steered", generate_graphs(family, True)))}


def pipeline_counts(family: str) -> dict:
    from tests.conftest import CONCEPT_CONTROL, CONCEPT_SOURCE, CONCEPT_TARGET
    from tests.diffusion.test_families import pipeline_kwargs
    from tests.diffusion.tiny_pipelines import CALL_KWARGS
    from tests.graph_counts import shape_graphs

    size = CALL_KWARGS[family]["height"]
    call = {k: v for k, v in CALL_KWARGS[family].items() if k not in ("height", "width")}
    shapes = [(size, 1), (2 * size, 1), (3 * size, 1), (size, 2), (size, 3), (2 * size, 2)]
    steering = _pipeline(family).fit_steering(
        CONCEPT_SOURCE, CONCEPT_TARGET, CONCEPT_CONTROL, method="mean_shift", pca_rank=10, num_inference_steps=1,
        batch_size=12, height=size, width=size, progress=False, pipeline_kwargs=pipeline_kwargs(family))
    counts = {}
    for side in ("stock", "steered"):
        pipe = _pipeline(family)
        if side == "steered":
            pipe.set_steering(steering)
        seen = shape_graphs(pipe, shapes, **call)
        counts[side] = (seen.graphs, sum(seen.breaks.values()))
    return counts


def _pipeline(family: str):
    """The library's pipeline of `family`, tiny and random (the same weights at every call)."""
    from dsas_diffusion import DSASStableDiffusionPipeline
    from tests.diffusion.test_families import named_pipeline
    from tests.diffusion.tiny_pipelines import tiny_components

    if family != "stable_diffusion":
        return named_pipeline(family)
    pipe = DSASStableDiffusionPipeline(**tiny_components(family))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    from tests.diffusion.test_families import NAMED
    from tests.llm.tiny_lms import MORE_FAMILIES

    lms = ["gpt2", "llama", "qwen2", "gemma2", *MORE_FAMILIES]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help=f"'llm', 'pipelines' or family names (language models: {', '.join(lms)}; "
                             f"pipelines: stable_diffusion, {', '.join(NAMED)})")
    args = parser.parse_args()
    cases = {**{f: lm_counts for f in lms}, **{f: pipeline_counts for f in ("stable_diffusion", *NAMED)}}
    wanted = set(args.only or ["llm", "pipelines"])
    unknown = wanted - set(cases) - {"llm", "pipelines"}
    if unknown:
        parser.error(f"--only {' '.join(sorted(unknown))}: not a family; choose from llm, pipelines, {', '.join(cases)}")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # count, never fall back
    results = {}
    for family, count in cases.items():
        kind = "llm" if count is lm_counts else "pipelines"
        if family not in wanted and kind not in wanted:
            continue
        counts = count(family)
        (stock, stock_breaks), (steered, breaks) = counts["stock"], counts["steered"]
        met = steered <= stock + 1 and breaks <= stock_breaks
        results[family] = {"stock": {"graphs": stock, "breaks": stock_breaks},
                           "steered": {"graphs": steered, "breaks": breaks}, "met": met}
        print(f"{family:20s} graphs {steered:2d} steered vs {stock:2d} stock, graph breaks {breaks} vs {stock_breaks}"
              f"  target: at most one graph more, no added break: {'met' if met else 'MISSED'}", flush=True)
    from dsas_diffusion.core.io import write_text_atomic

    out = RESULTS / "graph_counts.json"  # the families run now replace their earlier entries
    earlier = json.loads(out.read_text()) if out.exists() else {}
    write_text_atomic(out, json.dumps({**earlier, **results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
