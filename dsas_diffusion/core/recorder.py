"""Recording a layer's lambdas from inside a compiled graph without a guard or a graph break.

Eager hooks append the lambdas of each call to a Python list. Traced by torch.compile, the same
append would make Dynamo guard on the list's length (a recompile at every denoising step), and
hiding it behind `torch.compiler.disable` breaks the graph. A custom op is opaque to Dynamo: it
is one node of the graph, whatever its implementation does when the graph runs. So under
compile the hook calls `dsas::record`, whose implementation looks up the recording list of the
thread that runs the graph and appends a copy of the lambdas (a copy, because the compiler may
reuse the memory of an intermediate tensor once the graph no longer needs it).

The op declares that it mutates its `token` argument (a one-element counter it increments), so no
compiler pass drops it as dead code. It is tagged cudagraph-unsafe: a replayed CUDA graph would
not run its Python, so under `mode="reduce-overhead"` the compiler keeps it outside the recorded
CUDA graphs (or record_scales=False leaves it out of the graph altogether).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import Callable

import torch

_SINKS: "weakref.WeakValueDictionary[int, _Sink]" = weakref.WeakValueDictionary()
_IDS = itertools.count()
_LOCK = threading.Lock()


class _Sink:
    """Where one recorder's lambdas go: `target()` returns the calling thread's list, or None to drop them."""

    def __init__(self, target: Callable[[], list]):
        self.target = target


_TAGS = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t is not None)


@torch.library.custom_op("dsas::record", mutates_args=("token",), tags=_TAGS)
def _record(lam: torch.Tensor, token: torch.Tensor, sink: int) -> None:
    token.add_(1)
    found = _SINKS.get(sink)
    if found is not None:
        target = found.target()
        if target is not None:
            target.append(lam.clone())


@_record.register_fake
def _(lam, token, sink):
    return None


class Recorder:
    """Appends lambdas to `target()` (the calling thread's list; None: drop them) through `dsas::record`,
    from a graph torch.compile traces. Eager hooks append to that list themselves: they hold it already."""

    def __init__(self, target: Callable[[], list]):
        self._sink = _Sink(target)  # kept alive by this recorder; the registry holds it weakly
        with _LOCK:
            self._id = next(_IDS)
            _SINKS[self._id] = self._sink
        # one counter on the CPU for every device: made here, outside any trace, a graph reads it as an input
        self._token = torch.zeros(1, dtype=torch.int64)

    def record(self, lam: torch.Tensor) -> None:
        """Called while torch.compile traces: the graph runs the op, which appends when the graph runs."""
        torch.ops.dsas.record(lam, self._token, self._id)
