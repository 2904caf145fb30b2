"""Which steering is attached to which module, so that no module is steered twice by accident.

Two attachments hooking one module would both add their shift: attaching the same steering twice,
or setting it on a pipeline and also attaching it by hand, silently doubles alpha. The registry is
keyed weakly by module and holds weak references to the handles; a handle that was detached (or
collected) no longer counts, so nothing has to be cleared by hand.

An attachment may have an `owner`, an integration such as a pipeline that keeps its attachments
switched off (strength 0) except inside its own calls, and switches one on at a time. Attachments
with owners may share modules with each other; an attachment without one (always on) shares a
module with nothing.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, TypeVar
from weakref import WeakKeyDictionary

from torch import nn

H = TypeVar("H")


@dataclass(frozen=True)
class Attachment:
    handle: weakref.ref
    steering: str  # repr of the steering, for messages
    what: str  # "model", "unet", "text_encoder"
    modules: tuple[str, ...]  # full layer names hooked
    owner: weakref.ref | None

    @property
    def live(self) -> bool:
        handle = self.handle()
        return handle is not None and bool(getattr(handle, "attached", False))

    @property
    def owned(self) -> bool:
        return self.owner is not None


_lock = threading.RLock()
_live: "WeakKeyDictionary[nn.Module, list[Attachment]]" = WeakKeyDictionary()


def attach_exclusively(modules: dict[str, nn.Module], steering: Any, what: str, owner: Any,
                       make_handle: Callable[[], H]) -> H:
    """Make the handle with `make_handle()` unless one of `modules` (full layer name -> module) is
    already steered in a way that would make it steer twice; then raise a ValueError naming it."""
    with _lock:
        for name, module in modules.items():
            entries = [a for a in _live.get(module, ()) if a.live]
            clash = next((a for a in entries if not (a.owned and owner is not None)), None)
            if clash is not None:
                raise ValueError(_message(steering, what, name, clash, owner is not None))
        handle = make_handle()
        entry = Attachment(weakref.ref(handle), repr(steering), what, tuple(modules),
                           None if owner is None else weakref.ref(owner))
        for module in modules.values():
            _live[module] = [a for a in _live.get(module, ()) if a.live] + [entry]
        return handle


def attachments_of(module: nn.Module) -> list[Attachment]:
    """The live steering attachments hooking `module`."""
    with _lock:
        return [a for a in _live.get(module, ()) if a.live]


def _message(steering: Any, what: str, name: str, clash: Attachment, new_owned: bool) -> str:
    shown = ", ".join(clash.modules[:3]) + (" ..." if len(clash.modules) > 3 else "")
    head = (f"cannot attach {steering!r} to the {what}: its layer {name!r} already has a steering attached, "
            f"{clash.steering} on the {clash.what} ({len(clash.modules)} layers: {shown}). Two attachments on one "
            "module would both steer it, applying the shift twice. ")
    if clash.owned:
        return head + ("That steering is set on a pipeline: call pipe.set_steering(None) to remove it first, or "
                       "pass a steering for one call with pipe(..., steering=...)")
    fix = "Detach the existing one first (handle.detach(), or leave its `with` block)"
    if new_owned:
        fix += "; a pipeline steers with its own hooks, so set the steering with pipe.set_steering or pass it per call"
    return head + fix
