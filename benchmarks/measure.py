"""Timing and peak memory for side-by-side runs: CUDA allocator peaks on a GPU, sampled RSS on CPU."""

from __future__ import annotations

import statistics
import threading
import time
from contextlib import contextmanager

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextmanager
def peak_memory(device: str, result: dict):
    """result['peak'] = peak bytes while the block ran (GPU: allocated; CPU: process RSS, sampled every ms)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        yield
        result["peak"] = torch.cuda.max_memory_allocated()
        return
    import psutil

    _release_freed_heap()
    proc, peak, done = psutil.Process(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        result["peak"] = max(peak[0], proc.memory_info().rss)


def _release_freed_heap() -> None:
    """Give memory freed by earlier runs back to the OS (glibc keeps it mapped), so the RSS peak
    of a run measures that run and not what the allocator happened to retain before it."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS stays the rougher measure it is
        pass


def timed(fn, device: str) -> tuple[float, int]:
    """(seconds, peak bytes) of one call."""
    mem: dict = {}
    with peak_memory(device, mem):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        seconds = time.perf_counter() - start
    return seconds, mem["peak"]


def own_graph_cache(module: torch.nn.Module) -> None:
    """Give `module` a forward with a code object of its own (the same function otherwise).

    Dynamo keeps the graphs of a function on its code object, shared by every instance of a class,
    and tries the most recently used first: two copies called in turn each evaluated the other's
    guards before their own at every call [a stock graph compiled with torch's default hook guards
    passes all of them for a steered copy, which then fails only on the backend]. A copy timed
    against another must not pay for its neighbour's graphs."""
    import types

    forward = type(module).forward
    own = types.FunctionType(forward.__code__.replace(), forward.__globals__, forward.__name__,
                             forward.__defaults__, forward.__closure__)
    own.__kwdefaults__, own.__dict__ = forward.__kwdefaults__, dict(forward.__dict__)
    module.forward = types.MethodType(own, module)


def compile_as_stock(module: torch.nn.Module) -> None:
    """Compile `module` as a process without steering would, for the stock side of a compiled case:
    graphs of its own (`own_graph_cache`), and a backend object of its own, since Dynamo keys cached
    graphs on the backend too, so no steered module of the same class can reuse them. Call it under
    `torch_default_guards()`."""
    from torch._dynamo.backends.inductor import inductor

    def stock_inductor(gm, example_inputs, **kwargs):
        return inductor(gm, example_inputs, **kwargs)

    own_graph_cache(module)
    module.compile(backend=stock_inductor)


def torch_default_guards(fn):
    """`fn`, run with torch's default guards on module hooks (none on empty hook dicts): attaching
    steering turns those guards on for the process, which a stock model compiled in a process
    without steering would not pay [about 0.4 ms per decoding step of a 12-layer Llama on this CPU: benchmarks.compiled_step]."""
    def run(*args, **kwargs):
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):
            return fn(*args, **kwargs)
    return run


def graphs_built(fn, calls: int = 2) -> dict:
    """What torch.compile builds over `calls` calls of `fn` (the first compiles; later ones should
    only reuse): Dynamo's graph and graph-break counters, read before and after."""
    from torch._dynamo.utils import counters

    def snapshot():
        return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())

    graphs, breaks = snapshot()
    for _ in range(calls):
        fn()
    after = snapshot()
    return {"graphs": after[0] - graphs, "graph_breaks": after[1] - breaks}


def hook_seconds(roots, fn) -> float:
    """Seconds `fn()` spends inside the forward hooks and pre-hooks that dsas_diffusion registered on the
    modules under `roots`. On a CPU, where each op runs as it is called, that is the work steering adds
    to an eager call (but for its once-per-call bookkeeping outside the hooks), read directly: as the
    difference of two whole-call times it drowns in the few percent those vary by from run to run on a
    shared machine. Each hook is timed as called, cold caches after the layer before it included."""
    spent = [0.0]
    wrapped, seen = [], set()
    for root in roots:
        for module in root.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            for hooks in (module._forward_pre_hooks, module._forward_hooks):
                for key, hook in list(hooks.items()):
                    if getattr(hook, "__module__", "").startswith("dsas_diffusion."):
                        hooks[key] = _timed(hook, spent)
                        wrapped.append((hooks, key, hook))
    try:
        fn()
    finally:
        for hooks, key, hook in wrapped:
            if key in hooks:  # not removed while fn ran
                hooks[key] = hook
    return spent[0]


def _timed(hook, spent: list):
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return hook(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start
    return timed


def compare(cases: dict, device: str, repeats: int, warmup: int = 1, report=None, interleave: bool = False,
            hooks_of=None, hook_runs: int = 3) -> dict:
    """cases: {name: (baseline, candidate)}, each a `fn` or `(setup, fn)` (setup runs untimed first).

    Every candidate run follows its own baseline run (A B A B ...), so drift hits both alike.
    One case after another, or with `interleave` every case once per repeat (for cases read off
    against each other, such as generate minus prefill). Returns per case the medians over the
    repeats of the time and peak-memory ratios and of the raw seconds, and the raw seconds of each
    repeat (`runs`); `report(name, result)` is called as each case finishes.

    `hooks_of()`: the modules the candidates steer, on a CPU. Each case then also runs its candidate
    `hook_runs` more times, untimed as a whole, for the seconds spent inside the steering hooks
    (`hook_seconds`): the median is `hook_seconds`, and `hook_ratio` is 1 + that over the median
    baseline time, the overhead read without the run-to-run noise of whole calls."""
    def split(entry):
        return entry if isinstance(entry, tuple) else (lambda: None, entry)

    cases = {name: (split(b), split(c)) for name, (b, c) in cases.items()}
    rows = {name: {"time_ratio": [], "mem_ratio": [], "seconds": [], "base_seconds": []} for name in cases}

    def warm(name):
        for _ in range(warmup):
            for setup, fn in cases[name]:
                setup()
                fn()

    def once(name):
        (b_setup, b_fn), (c_setup, c_fn) = cases[name]
        b_setup()
        base_s, base_m = timed(b_fn, device)
        c_setup()
        s, m = timed(c_fn, device)
        for key, value in (("time_ratio", s / base_s), ("mem_ratio", m / base_m), ("seconds", s),
                           ("base_seconds", base_s)):
            rows[name][key].append(value)

    def finish(name):
        r = rows[name]
        result = {k: statistics.median(v) for k, v in r.items()}
        result["runs"] = {"seconds": r["seconds"], "base_seconds": r["base_seconds"]}
        if hooks_of is not None and not device.startswith("cuda"):  # on a GPU, host time in hooks is not the cost
            _, (c_setup, c_fn) = cases[name]
            spent = []
            for _ in range(hook_runs):
                c_setup()
                spent.append(hook_seconds(hooks_of(), c_fn))
            result["runs"]["hook_seconds"] = spent
            result["hook_seconds"] = statistics.median(spent)
            result["hook_ratio"] = 1 + result["hook_seconds"] / result["base_seconds"]
        if report is not None:
            report(name, result)
        return result

    if interleave:
        for name in cases:
            warm(name)
        for _ in range(repeats):
            for name in cases:
                once(name)
        return {name: finish(name) for name in cases}
    results = {}
    for name in cases:
        warm(name)
        for _ in range(repeats):
            once(name)
        results[name] = finish(name)
    return results


def compare_compiled(case: str, stock, steered, device: str, repeats: int, report) -> dict:
    """compare() of two compiled callables, with what each built over its first two calls (also
    the warm-up): steering traced in should add at most one graph and no graph break."""
    built = {"base": graphs_built(stock), "steered": graphs_built(steered)}
    result = compare({case: (stock, steered)}, device, repeats, warmup=0)[case]
    result.update({f"{key}_{who}": n for who, counts in built.items() for key, n in counts.items()})
    report(case, result)
    return {case: result}
