"""The model fingerprint a Steering carries."""

import pytest
import torch
from torch import nn

from dsas_diffusion.core.fingerprint import NUM_PROBE_VALUES, check_fingerprint, fingerprint


def test_probe_of_a_parameter_past_float32_integer_precision():
    # 2**24 + 4 elements: float32 cannot hold numel - 1 and rounds it past the end
    model = nn.Embedding(2**24 + 4, 1, dtype=torch.float16)
    with torch.no_grad():
        model.weight[-1] = 3.0
    info, probe = fingerprint(model)
    assert probe.shape == (NUM_PROBE_VALUES,) and probe[-1] == 3.0
    assert info["num_parameters"] == 2**24 + 4


def _stack():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.LayerNorm(16))


def test_a_model_that_differs_only_deep_inside_is_refused():
    """A fine-tune that leaves the embeddings as they were still moves the middle or last layers."""
    model = _stack()
    info, probe = fingerprint(model)
    assert info["probe_parameters"] == ["0.weight", "2.weight", "3.bias"]
    for name in ("2.weight", "3.bias"):
        tuned = _stack()
        with torch.no_grad():
            tuned.get_parameter(name).add_(0.5)
        with pytest.raises(ValueError, match="other weights"):
            check_fingerprint(info, probe, tuned, "model", None)
    check_fingerprint(info, probe, _stack().to(torch.bfloat16), "model", None)  # a dtype cast is the same model


def test_a_fingerprint_written_with_one_probe_still_checks():
    model = _stack()
    legacy = {"class": "Sequential", "num_parameters": sum(p.numel() for p in model.parameters()),
              "probe_parameter": "0.weight"}
    _, probe = fingerprint(model)
    check_fingerprint(legacy, probe[:NUM_PROBE_VALUES], model, "model", None)
    other = _stack()
    with torch.no_grad():
        other[0].weight.mul_(-1)
    with pytest.raises(ValueError, match="other weights"):
        check_fingerprint(legacy, probe[:NUM_PROBE_VALUES], other, "model", None)
