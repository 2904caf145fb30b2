"""A fingerprint of the model a Steering was fitted on, so it is never applied to another one.

Names and widths catch other architectures; a few weight values of one parameter catch other
checkpoints of the same architecture (fine-tunes, SD 1.4 vs 1.5 UNets) while staying stable
across dtype casts (fp16 / bf16 round the values by well under the tolerance used here).
"""

from __future__ import annotations

import torch
from torch import nn

NUM_PROBE_VALUES = 8


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


def fingerprint(root: nn.Module) -> tuple[dict, torch.Tensor | None]:
    """(JSON-able description, probe values; None where offloaded weights cannot be read)."""
    name, param = next(((n, p) for n, p in root.named_parameters() if p.numel() >= NUM_PROBE_VALUES), (None, None))
    n_params = sum(p.numel() for p in root.parameters())
    info = {"class": type(root).__name__, "num_parameters": n_params, "probe_parameter": name}
    if param is None:
        return info, torch.zeros(0)
    if param.is_meta:
        param = _offloaded_value(root, name)
        if param is None:
            return info, None
    # integer spacing: a float32 linspace rounds past the end once a tensor passes 2**24 elements
    idx = torch.arange(NUM_PROBE_VALUES) * (param.numel() - 1) // (NUM_PROBE_VALUES - 1)
    return info, param.detach().flatten()[idx.to(param.device)].float().cpu()


def check_fingerprint(saved: dict, probe: torch.Tensor, root: nn.Module, what: str, base_model: str | None) -> None:
    info, values = fingerprint(root)
    origin = f" ({base_model})" if base_model else ""
    fix = "fit the steering again on this model, or pass check_model=False if you know the two are the same"
    if saved.get("class") != info["class"] or saved.get("num_parameters") != info["num_parameters"]:
        raise ValueError(
            f"this steering was fitted on a {what} of class {saved.get('class')} with {saved.get('num_parameters'):,} "
            f"parameters{origin}; this {what} is a {info['class']} with {info['num_parameters']:,}: {fix}"
        )
    if values is None:  # offloaded weights out of reach: the architecture check above is all we can do
        return
    if saved.get("probe_parameter") != info["probe_parameter"] or not torch.allclose(
        values, probe, rtol=2e-2, atol=1e-3
    ):
        raise ValueError(
            f"this steering was fitted on a {what} with other weights{origin} (same architecture, different "
            f"checkpoint: {saved.get('probe_parameter')} differs): {fix}"
        )
