"""A fingerprint of the model a Steering was fitted on, so it is never applied to another one.

Names and widths catch other architectures; a few weight values of three parameters catch other
checkpoints of the same architecture (fine-tunes, SD 1.4 vs 1.5 UNets) while staying stable
across dtype casts (fp16 / bf16 round the values by well under the tolerance used here).

Adapters (LoRA and the other PEFT tuners, as diffusers' `load_lora_weights` and transformers'
`add_adapter` inject them) wrap a layer and keep its weights as `base_layer`: the fingerprint
reads the base model only, so a steering fitted without a LoRA is accepted with one loaded (the
steering then acts on the activations the LoRA gives), and one fitted with a LoRA loaded without.
A LoRA fused into the weights changes them, and is refused like any other checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

NUM_PROBE_VALUES = 8


def base_parameters(root: nn.Module) -> dict[str, tuple[str, nn.Parameter]]:
    """{name in the base model: (name in `root`, parameter)}: an adapter wrapper's `base_layer`
    is read under the wrapper's own name, and the adapter's weights are left out."""
    wrappers = {name for name, m in root.named_modules() if isinstance(getattr(m, "base_layer", None), nn.Module)}
    out = {}
    for name, param in root.named_parameters():
        parts = name.split(".")
        owner = next((i for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in wrappers), None)
        if owner is not None:
            if parts[owner] != "base_layer":
                continue  # the adapter's own weights (lora_A, lora_B, ...)
            parts = parts[:owner] + parts[owner + 1:]
        out[".".join(parts)] = (name, param)
    return out


def _offloaded_value(root: nn.Module, name: str) -> torch.Tensor | None:
    """The real tensor behind a `meta` parameter under accelerate's CPU offload: the offload hook
    of the owning module keeps it in its `weights_map` (read by duck typing, no accelerate import)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    hook = getattr(owner, "_hf_hook", None)
    for h in getattr(hook, "hooks", [hook]):
        weights = getattr(h, "weights_map", None)
        if weights is not None:
            try:
                return weights[leaf]
            except KeyError:
                pass
    return None


def _probe_names(root: nn.Module) -> list[str]:
    """The first, middle and last parameters with enough values: a fine-tune that leaves the
    embeddings almost untouched still moves the layers deeper in."""
    names = [n for n, (_, p) in base_parameters(root).items() if p.numel() >= NUM_PROBE_VALUES]
    if not names:
        return []
    return list(dict.fromkeys([names[0], names[len(names) // 2], names[-1]]))


def _probe_values(root: nn.Module, names: list[str]) -> torch.Tensor | None:
    """NUM_PROBE_VALUES evenly spaced values of each named parameter; None where offloaded weights
    cannot be read. A name the model lacks raises KeyError."""
    params = base_parameters(root)
    values = []
    for name in names:
        real, param = params[name]
        if param.is_meta:
            param = _offloaded_value(root, real)
            if param is None:
                return None
        # integer spacing: a float32 linspace rounds past the end once a tensor passes 2**24 elements
        idx = torch.arange(NUM_PROBE_VALUES) * (param.numel() - 1) // (NUM_PROBE_VALUES - 1)
        values.append(param.detach().flatten()[idx.to(param.device)].float().cpu())
    return torch.cat(values) if values else torch.zeros(0)


def fingerprint(root: nn.Module) -> tuple[dict, torch.Tensor]:
    """(JSON-able description, probe values). Where offloaded weights cannot be read, no parameter
    is probed (an empty list and no values): the check falls back to class and size."""
    names = _probe_names(root)
    n_params = _count(root)
    values = _probe_values(root, names)
    if values is None:
        names, values = [], torch.zeros(0)
    info = {"class": type(root).__name__, "num_parameters": n_params, "probe_parameters": names}
    return info, values


def _count(root: nn.Module) -> int:
    return sum(p.numel() for _, p in base_parameters(root).values())


def check_fingerprint(saved: dict, probe: torch.Tensor, root: nn.Module, what: str, base_model: str | None) -> None:
    n_params = _count(root)
    origin = f" ({base_model})" if base_model else ""
    fix = "fit the steering again on this model, or pass check_model=False if you know the two are the same"
    if saved.get("class") != type(root).__name__ or saved.get("num_parameters") != n_params:
        raise ValueError(
            f"this steering was fitted on a {what} of class {saved.get('class')} with {saved.get('num_parameters'):,} "
            f"parameters{origin}; this {what} is a {type(root).__name__} with {n_params:,}: {fix}"
        )
    # files written before the middle and last probes were added name one parameter
    names = saved.get("probe_parameters", [saved["probe_parameter"]] if saved.get("probe_parameter") else [])
    try:
        values = _probe_values(root, names)
    except KeyError as e:
        raise ValueError(f"this steering was fitted on a {what} with other parameter names{origin} "
                         f"({e.args[0]!r} is missing here): {fix}") from None
    if values is None:  # offloaded weights out of reach: the architecture check above is all we can do
        return
    probe = probe.float()  # a probe read from a half-precision file compares like any other
    if values.shape != probe.shape or not torch.allclose(values, probe, rtol=2e-2, atol=1e-3):
        raise ValueError(
            f"this steering was fitted on a {what} with other weights{origin} (same architecture, different "
            f"checkpoint: the values of {', '.join(names)} differ): {fix}"
        )
