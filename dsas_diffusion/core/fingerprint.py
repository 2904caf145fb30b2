"""A fingerprint of the model a Steering was fitted on, so it is never applied to another one.

Names and widths catch other architectures; a few weight values of one parameter catch other
checkpoints of the same architecture (fine-tunes, SD 1.4 vs 1.5 UNets) while staying stable
across dtype casts (fp16 / bf16 round the values by well under the tolerance used here).
"""

from __future__ import annotations

import torch
from torch import nn

NUM_PROBE_VALUES = 8


def fingerprint(root: nn.Module) -> tuple[dict, torch.Tensor]:
    """(JSON-able description, probe values) of a model."""
    name, param = next(((n, p) for n, p in root.named_parameters() if p.numel() >= NUM_PROBE_VALUES), (None, None))
    n_params = sum(p.numel() for p in root.parameters())
    info = {"class": type(root).__name__, "num_parameters": n_params, "probe_parameter": name}
    if param is None:
        return info, torch.zeros(0)
    idx = torch.linspace(0, param.numel() - 1, NUM_PROBE_VALUES).long()
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
    if saved.get("probe_parameter") != info["probe_parameter"] or not torch.allclose(
        values, probe, rtol=2e-2, atol=1e-3
    ):
        raise ValueError(
            f"this steering was fitted on a {what} with other weights{origin} (same architecture, different "
            f"checkpoint: {saved.get('probe_parameter')} differs): {fix}"
        )
