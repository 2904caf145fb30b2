"""Recording a layer's lambdas from inside a compiled graph without a guard or a graph break.

Eager hooks append the lambdas of each call to a Python list. Traced by torch.compile, the same
append would make Dynamo guard on the list's length (a recompile at every denoising step), and
hiding it behind `torch.compiler.disable` breaks the graph. A custom op is opaque to Dynamo: it
is one node of the graph, whatever its implementation does when the graph runs. So under
compile the hook calls `dsas::record`, whose implementation looks up the recording list of the
thread that runs the graph and appends a copy of the lambdas (a copy, because the compiler may
reuse the memory of an intermediate tensor once the graph no longer needs it).

The op is declared side-effectful (`torch.fx.node.has_side_effect`), so no compiler pass drops it
as dead code although nothing reads its result. It is defined with `torch.library.Library` and a
plain kernel rather than `torch.library.custom_op`: inside a compiled graph each call of a
`custom_op` that mutated a counter (its former way of staying alive) cost about 76 us on the CPU,
this one about 23 us, once per steered layer and forward. It is tagged cudagraph-unsafe: a
replayed CUDA graph would not run its Python, so under `mode="reduce-overhead"` the compiler keeps
it outside the recorded CUDA graphs (or record_scales=False leaves it out of the graph altogether).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import Callable

import torch
from torch.fx.node import has_side_effect

_SINKS: "weakref.WeakValueDictionary[int, _Sink]" = weakref.WeakValueDictionary()
_IDS = itertools.count()
_LOCK = threading.Lock()


class _Sink:
    """Where one recorder's lambdas go: `target()` returns the calling thread's list, or None to drop them."""

    def __init__(self, target: Callable[[], list]):
        self.target = target


_TAGS = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t is not None)
_LIB = torch.library.Library("dsas", "FRAGMENT")  # module-level: the op lives as long as the process
_LIB.define("record(Tensor lam, int sink) -> ()", tags=_TAGS)


def _record(lam: torch.Tensor, sink: int) -> None:
    found = _SINKS.get(sink)
    if found is not None:
        target = found.target()
        if target is not None:
            target.append(lam.clone())


_LIB.impl("record", _record, "CompositeExplicitAutograd")
torch.library.register_fake("dsas::record", lambda lam, sink: None, lib=_LIB)
has_side_effect(torch.ops.dsas.record.default)


class Recorder:
    """Appends lambdas to `target()` (the calling thread's list; None: drop them) through `dsas::record`,
    from a graph torch.compile traces. Eager hooks append to that list themselves: they hold it already."""

    def __init__(self, target: Callable[[], list]):
        self._sink = _Sink(target)  # kept alive by this recorder; the registry holds it weakly
        with _LOCK:
            self._id = next(_IDS)
            _SINKS[self._id] = self._sink

    def record(self, lam: torch.Tensor) -> None:
        """Called while torch.compile traces: the graph runs the op, which appends when the graph runs."""
        torch.ops.dsas.record(lam, self._id)
