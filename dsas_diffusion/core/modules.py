"""Where to steer: resolving module names and regular expressions on a torch model."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn


def find_modules(root: nn.Module, pattern: str, what: str = "model", argument: str = "") -> list[str]:
    """Names of the modules of `root` whose full name matches `pattern` (re.fullmatch); `argument`
    names the user's argument that gave the pattern, in the error."""
    said = f"{argument}={pattern!r}: " if argument else ""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{said}layer pattern {pattern!r} is not a valid regular expression: {e}") from None
    names = [n for n, _ in root.named_modules() if n and regex.fullmatch(n)]
    if not names:
        examples = [n for n, _ in root.named_modules() if n][:8]
        raise ValueError(
            f"{said}no module of the {what} ({type(root).__name__}) matches the layer pattern {pattern!r}. "
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


def check_weights_loaded(root: nn.Module, what: str = "model") -> None:
    """Weights on the meta device (an empty-weights init, an unfinished offload) have no values, so
    activations read from them would be garbage or fail deep inside torch."""
    if any(p.is_meta for p in root.parameters()):
        raise ValueError(
            f"the {what} has weights on the 'meta' device (no values loaded); load it with its weights, e.g. "
            "from_pretrained(...) without init_empty_weights / low_cpu_mem_usage tricks, or .to_empty() and load a "
            "state dict, before fitting"
        )


# Names of the modules whose output a block's caller reads: good places to steer.
_STEERABLE_PARTS = ("o_proj", "out_proj", "c_proj", "dense", "attn2", "attn1", "to_out")


def _suggested_patterns(module: nn.Module, name: str, limit: int = 3) -> list[str]:
    """Regular expressions for repeated blocks below `name` (children of a ModuleList) and their
    attention output projections: modules that return a tensor in every architecture we know."""
    found: list[str] = []
    for sub, m in module.named_modules(prefix=name):
        parts = sub.split(".")
        if sub == name or isinstance(m, (nn.ModuleList, nn.ModuleDict)):
            continue
        if parts[-1].isdigit() or parts[-1] in _STEERABLE_PARTS:
            pattern = r"\.".join(r"\d+" if p.isdigit() else re.escape(p) for p in parts)
            if pattern not in found:
                found.append(pattern)
        if len(found) >= limit:
            break
    return found


def _describe(output) -> str:
    if output is None:
        return "None"
    if isinstance(output, (tuple, list)):
        first = "nothing" if not output else f"a {type(output[0]).__name__}"
        return f"a {type(output).__name__} whose first element is {first}"
    if isinstance(output, Mapping):  # transformers' ModelOutput is an OrderedDict
        return f"a {type(output).__name__} (fields {list(output.keys())[:4]})"
    return f"a {type(output).__name__}"


def layer_activation(name: str, module: nn.Module, output, element: int = 0) -> torch.Tensor:
    """The activation a hook reads and replaces (a tensor, or element `element` of a tuple or of a
    list: OpenAI-GPT's blocks return one, SD3 / FLUX joint blocks return (text, image)), refused with
    the module's name and what to pick instead when the module returns anything else."""
    if isinstance(output, (tuple, list)):
        x = output[element] if len(output) > element else None
    else:
        x = output
    if isinstance(x, torch.Tensor) and x.is_floating_point() and 2 <= x.dim() <= 4:
        return x
    if isinstance(x, torch.Tensor):
        got = f"a {x.dtype} tensor of shape {tuple(x.shape)}"
        need = "floating activations of shape (batch, tokens, width), (batch, width) or (batch, channels, H, W)"
    else:
        got, need = _describe(output), f"a tensor (or a tuple whose element {element} is one)"
    suggestions = _suggested_patterns(module, name)
    shown = ", ".join("r'" + s + "'" for s in suggestions)  # as the user would type them
    instead = f"e.g. {shown}" if suggestions else "its parent block or a neighbouring projection"
    # ValueError, not TypeError: the layer pattern (a string, as it should be) picked the wrong module
    raise ValueError(
        f"layer {name!r} ({type(module).__name__}) returns {got}, but capturing or steering a layer needs {need}. "
        f"Pick a module whose output is one instead: a decoder block or its attention output projection, {instead}"
    )
