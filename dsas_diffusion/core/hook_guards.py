"""What torch.compile guards on about the hooks of a steered model, and what that costs per call.

Dynamo installs no guard on a module's empty hook dicts by default
(`torch._dynamo.config.skip_nnmodule_hook_guards`) and, tracing modules inline, none on which instance
it runs: a graph compiled for an unsteered model is then reused for a steered one of the same class,
and the steering silently does not run (measured: a steered copy compiled after a stock one built no
graph of its own). Attaching steering therefore turns those guards on for the process.

A graph traced through a steered forward does not need them: it guards on the non-empty hook dicts
of its own steered layers, which no unsteered model passes. There they were about 950 guards on a
12-layer Llama (six dicts per module), checked at every call: about 0.4 ms per compiled decoding step
on this CPU (`benchmarks.compiled_step`). So a steered root's forward runs with torch's default
(`enter_steered_forward`, from the root's eager pre-hook, until an always-called post-hook), and what
the skipped guards would have caught, hooks added later under a compiled steered forward, is caught
by an epoch instead: attaching or removing hooks on a root bumps the epoch of every hooked root that
contains it or that it contains, and a traced steering hook guards on its root's epoch
(`HookEpoch.guard`). Hooks added by others after compiling are skipped, as torch.compile skips them
on any model. The setting is process-wide: a module of another thread compiled while a steered
forward runs gets torch's default too."""

from __future__ import annotations

import threading
import warnings
import weakref

from torch import nn

_lock = threading.Lock()
_depth = 0  # steered forwards running now, in any thread
_saved: bool | None = None  # the setting they replaced
_config = None  # torch._dynamo.config, imported once, not at every forward


def _dynamo_config():
    global _config
    if _config is None:
        from torch._dynamo import config

        _config = config
    return _config


def guard_hooks_under_compile() -> None:
    """Make torch.compile tell a hooked module from an unhooked one of the same class (see the module
    docstring). Graphs compiled before the first attachment lack the guard: say so, since only a reset
    drops them."""
    global _saved
    from torch._dynamo.utils import counters

    config = _dynamo_config()
    if not getattr(config, "skip_nnmodule_hook_guards", False):  # guarded already, or a torch without the option
        return
    with _lock:
        if _depth:  # attached from inside a steered forward: set for after it
            _saved = False
            return
        config.skip_nnmodule_hook_guards = False
    if counters["stats"]["unique_graphs"]:  # Dynamo's own count of the graphs it built in this process
        warnings.warn(
            "a module was compiled with torch.compile before steering was first attached in this process; "
            "torch.compile may reuse such a graph, without the steering, for a steered module of the same class. "
            "Call torch._dynamo.reset() before compiling the steered module, or attach steering before compiling "
            "anything", stacklevel=3)


def enter_steered_forward() -> None:
    """A hooked root's forward begins (its eager pre-hook): graphs traced until it ends skip the guards on
    empty hook dicts, as torch's default has it."""
    global _depth, _saved
    config = _dynamo_config()
    with _lock:
        if _depth == 0:
            _saved = getattr(config, "skip_nnmodule_hook_guards", None)
            if _saved is not None:
                config.skip_nnmodule_hook_guards = True
        _depth += 1


def leave_steered_forward() -> None:
    """The forward ended, returning or raising (an always-called hook): the setting is restored with the last."""
    global _depth, _saved
    config = _dynamo_config()
    with _lock:
        if _depth == 0:
            return
        _depth -= 1
        if _depth == 0 and _saved is not None:
            config.skip_nnmodule_hook_guards = _saved
            _saved = None


class HookEpoch:
    """How many times hooks were attached or removed on modules a hooked root shares; read by a traced
    hook (`guard`), so that a graph traced before a change is not reused after it."""

    __slots__ = ("value", "__weakref__")

    def __init__(self):
        self.value = 0

    def guard(self) -> None:
        """Called while tracing: the comparison makes Dynamo guard on the value."""
        if self.value < 0:
            raise AssertionError("a hook epoch never goes below 0")


_epochs: "weakref.WeakKeyDictionary[nn.Module, HookEpoch]" = weakref.WeakKeyDictionary()


def epoch_of(root: nn.Module) -> HookEpoch:
    with _lock:
        epoch = _epochs.get(root)
        if epoch is None:
            epoch = _epochs[root] = HookEpoch()
        return epoch


def hooks_changed(root: nn.Module) -> None:
    """Hooks were attached to or removed from modules under `root`: bump the epoch of every hooked root
    that shares modules with it (itself, those under it, those it is under)."""
    below = {id(m) for m in root.modules()}
    with _lock:
        roots = list(_epochs.items())
    for other, epoch in roots:
        if id(other) in below or any(m is root for m in other.modules()):
            epoch.value += 1
