"""Forward hooks on named modules: capture pooled activations for fitting, or steer them.

Both are plain torch hooks kept as handles and removed in `remove()`, so detaching leaves the
model exactly as it was. Per-call state (masks, batch rows, ...) lives in a `CallState` of the
hook set per thread, never on a class or a module: two models (or two attachments) in one process
stay independent, and so do two threads running one model, since a hook runs in the thread of the
forward that called it and reads that thread's state.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Callable

import torch
from torch import nn

from .hook_guards import enter_steered_forward, epoch_of, guard_hooks_under_compile, hooks_changed, \
    leave_steered_forward
from .modules import check_not_compiled, get_module, layer_activation

PreForward = Callable[["HookSet", tuple, dict], None]


def as_tokens(x: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """View (B, K, D) activations as they are and (B, C, H, W) ones as (B, H*W, C); return the inverse."""
    if x.dim() == 3:
        return x, lambda y: y
    if x.dim() == 4:
        b, c, h, w = x.shape
        return x.flatten(2).transpose(1, 2), lambda y: y.transpose(1, 2).reshape(b, c, h, w)
    if x.dim() == 2:
        return x.unsqueeze(1), lambda y: y.squeeze(1)
    raise ValueError(f"cannot steer an activation of shape {tuple(x.shape)}; expected (B, K, D) or (B, C, H, W)")


def masked_mean(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean over positions (dim 1) of (B, K, D), the positions where `valid` (B, K) is False excluded (selected
    out, so a NaN there stays out)."""
    if valid is None:
        return x.mean(1)
    keep = valid.to(device=x.device, dtype=torch.bool).unsqueeze(-1)
    return torch.where(keep, x, 0.0).sum(1) / keep.sum(1).to(x.dtype).clamp_min(1)


def steered_positions(valid: torch.Tensor | None, b: int, k: int, device, skip_first: bool) -> torch.Tensor | None:
    """(B, K) bool: the positions run time steers, and so the only ones fitting may read: the real
    tokens (`valid`, None: all), less each row's first real token when `skip_first`. None when that
    is every position.

    The one rule fitting and run time share [choice, measured]: in a causal model the first position
    attends only to itself and becomes an attention sink (in SmolLM2-135M from layer 5 on its norm is
    about 24,000 against 170 for other tokens, nearly all in one dimension); averaged into a pooled
    vector it adds x0 / length, and the gate then reads length instead of content. A position never
    steered must not shape what is fitted. Whether an encoder has such a first token (BOS) is the
    caller's fact: T5 has none, and its first token is a word."""
    if not skip_first:
        return valid
    v = torch.ones(b, k, dtype=torch.bool, device=device) if valid is None else valid.to(device=device,
                                                                                           dtype=torch.bool)
    seen = v.long().cumsum(1)
    return v & (seen > 1)


class CallState:
    """The state of the calls one thread makes through a hook set (see `HookSet.call`)."""

    def __init__(self):
        self.valid: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None
        self.at: torch.Tensor | None = None  # (B, K): the positions an ActivationCapture records running means at
        self.entered = 0  # forwards of the root begun and not yet ended in this thread


class _PerThread(threading.local):
    """`call`: a fresh state, made by `new` the first time a thread reads it."""

    def __init__(self, new: Callable[[], CallState]):
        self.call = new()


class HookSet:
    """Hooks on a set of named modules of one root model, plus the per-call state they read.

    `valid` (B, K) marks real tokens of the current forward (None: all real) and `rows` (B,)
    marks the batch rows to touch (None: all); an integration sets them, directly or through a
    `pre_forward(hookset, args, kwargs)` callback that runs before every forward of the root.
    Both belong to the calling thread (`call`), like all per-call state: threads sharing a model
    never see each other's.
    """

    # hooks that replace a layer's output go first among the module's forward hooks, whenever the others
    # were added, so whoever else reads the layer's output sees it steered (transformers 5 records
    # `hidden_states` with hooks installed at a model's first forward; SDXL and SD3 read CLIP's
    # hidden_states[-2]); others (a capture) run in the order they were added, after those
    first = False

    def __init__(self, root: nn.Module, names: list[str], pre_forward: PreForward | None = None, what: str = "model",
                 elements: dict[str, int] | None = None):
        check_not_compiled(root, what)
        guard_hooks_under_compile()
        self.root = root
        self.modules = {n: get_module(root, n, what) for n in names}
        self.elements = dict(elements or {})  # {name: i}: read and replace output[i] of a tuple output, not output[0]
        self._local = _PerThread(self._new_call_state)
        self._pre_forward = pre_forward
        self._handles: list = []
        self._epoch = epoch_of(root)

    def _new_call_state(self) -> CallState:
        return CallState()

    @property
    def call(self) -> CallState:
        """This thread's call state: a hook reads it in the thread of the forward that runs it."""
        return self._local.call

    @property
    def valid(self) -> torch.Tensor | None:
        return self._local.call.valid

    @valid.setter
    def valid(self, value: torch.Tensor | None) -> None:
        self._local.call.valid = value

    @property
    def rows(self) -> torch.Tensor | None:
        return self._local.call.rows

    @rows.setter
    def rows(self, value: torch.Tensor | None) -> None:
        self._local.call.rows = value

    def _attach(self):
        # the root's pre-hook runs eagerly, also when the root is compiled: torch.compile runs a compiled
        # module's hooks as frames of their own, and traced, each was a frame with a graph per input shape
        # and its own guard check at every call (4 frames per decoding step of a language model, whose
        # pre_forward keeps Python state, against 1 for the forward), for a few ops on masks
        # and the forward traces with torch's default guards on hooks (core/hook_guards.py)
        @torch.compiler.disable
        def begin_call(module, args, kwargs):
            enter_steered_forward()
            self._local.call.entered += 1
            self._begin_call(args, kwargs)

        @torch.compiler.disable
        def end_call(module, args, output):
            call = self._local.call
            if not call.entered:  # another pre-hook of the root raised before this one's ran
                return
            call.entered -= 1
            try:
                self._end_call()
            finally:
                leave_steered_forward()

        self._handles.append(self.root.register_forward_pre_hook(begin_call, with_kwargs=True))
        self._handles.append(self.root.register_forward_hook(end_call, always_call=True))
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name), prepend=self.first))
        hooks_changed(self.root)

    def _make_hook(self, name: str):
        element = self.elements.get(name, 0)

        def hook(module, args, output):
            if torch.compiler.is_compiling():  # a graph traced here is not reused once hooks change
                self._epoch.guard()
            x = layer_activation(name, module, output, element)  # refuses a ModelOutput, a dict, ... by name
            if isinstance(output, (tuple, list)):
                new = self._on_output(name, x)
                if new is None:
                    return None
                out = list(output)
                out[element] = new
                return tuple(out) if isinstance(output, tuple) else out
            return self._on_output(name, x)
        return hook

    def _begin_call(self, args: tuple, kwargs: dict) -> None:
        """Runs before every forward of the root: a new call begins."""
        if self._pre_forward is not None:
            self._pre_forward(self, args, kwargs)

    def _end_call(self) -> None:
        """Runs after every forward of the root, eagerly."""

    def _on_output(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def remove(self):
        for h in self._handles:
            h.remove()
        if self._handles:
            hooks_changed(self.root)
        self._handles.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def prefix_means(x: torch.Tensor, read: torch.Tensor | None, at: torch.Tensor) -> torch.Tensor:
    """(marked positions, D): at each position marked in `at` (B, K), the mean of x (B, K, D) over the
    positions of its row up to there that `read` (B, K) marks (None: all), in row-major order. What a
    causal gate reads at that position."""
    v = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if read is None else read.to(x.dtype)
    total = (x if read is None else torch.where(read.bool().unsqueeze(-1), x, 0.0)).cumsum(1)
    return total[at] / v.cumsum(1)[at].clamp_min(1).unsqueeze(-1)


class ActivationCapture(HookSet):
    """Records, per module and per forward call, the mean activation of the selected rows over the
    positions run time steers (`steered_positions`: padding and, with `skip_first`, the first token
    excluded); or, when a call sets `at` (B, K), the running mean up to each marked position
    (`prefix_means`), one record per marked position: the means a causal gate reads.

    The means are kept as float32 on the CPU: fitting needs (examples, D), never the full
    (examples, tokens, D) activations. `skip_first` and `at` apply to token activations (B, K, D)
    only; spatial ones (B, C, H, W) have no first token.
    """

    def __init__(self, root, names, pre_forward=None, what="model", elements=None, skip_first: bool = False):
        super().__init__(root, names, pre_forward, what, elements)
        self.skip_first = skip_first
        self.pooled: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._attach()

    @property
    def at(self) -> torch.Tensor | None:
        return self._local.call.at

    @at.setter
    def at(self, value: torch.Tensor | None) -> None:
        self._local.call.at = value

    def _on_output(self, name, x):
        tokens, _ = as_tokens(x)
        skip = self.skip_first and x.dim() == 3
        read = steered_positions(self.valid, *tokens.shape[:2], tokens.device, skip)
        at = self.at
        if at is not None:
            self.pooled[name].append(prefix_means(tokens.float(), read, at.to(tokens.device)).detach().cpu())
            return None
        pooled = masked_mean(tokens.float(), read)
        if self.rows is not None:
            pooled = pooled[self.rows.to(pooled.device)]
        self.pooled[name].append(pooled.detach().cpu())
        return None

    def collect(self) -> dict[str, torch.Tensor]:
        """(num_calls * rows, D) per module, in call order; errors on NaN / inf activations."""
        out = {}
        for name, chunks in self.pooled.items():
            acts = torch.cat(chunks)
            if not torch.isfinite(acts).all():
                raise ValueError(
                    f"activations of layer {name!r} contain NaN or inf; the model overflows in its current dtype. "
                    "Fit in float32 (`.to(torch.float32)`), or exclude that layer with the layer pattern"
                )
            out[name] = acts
        return out
