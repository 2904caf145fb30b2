"""Where to steer: resolving module names and regular expressions on a torch model."""

from __future__ import annotations

import re

from torch import nn


def find_modules(root: nn.Module, pattern: str, what: str = "model") -> list[str]:
    """Names of the modules of `root` whose full name matches `pattern` (re.fullmatch)."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"layer pattern {pattern!r} is not a valid regular expression: {e}") from None
    names = [n for n, _ in root.named_modules() if n and regex.fullmatch(n)]
    if not names:
        examples = [n for n, _ in root.named_modules() if n][:8]
        raise ValueError(
            f"no module of the {what} ({type(root).__name__}) matches the layer pattern {pattern!r}. "
            f"Module names look like: {', '.join(examples)} ... "
            "Pass a regular expression that fully matches some of them."
        )
    return names


def get_module(root: nn.Module, name: str, what: str = "model") -> nn.Module:
    try:
        return root.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"the {what} ({type(root).__name__}) has no module named {name!r}; this steering was fitted on a "
            "model with another architecture: fit it again on this model"
        ) from None


def module_width(module: nn.Module) -> int | None:
    """Best guess of a module's output width without running it: the leading size of its last
    parameter (the output bias or weight of the final projection / norm in every block we target)."""
    last = None
    for p in module.parameters():
        last = p
    return None if last is None or last.dim() == 0 else int(last.shape[0])


def check_not_compiled(root: nn.Module, what: str = "model") -> None:
    """Hooks added to an already compiled module are silently skipped by torch.compile (it does not
    guard on forward hooks), so steering or capturing there would quietly do nothing."""
    if hasattr(root, "_orig_mod") or getattr(root, "_compiled_call_impl", None) is not None:
        raise ValueError(
            f"the {what} is already compiled with torch.compile, and torch.compile ignores hooks added after "
            "compiling. Attach the steering first (pipe.set_steering / steering.attach), then compile; or fit "
            "and attach on the uncompiled module"
        )
