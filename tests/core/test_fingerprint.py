"""The model fingerprint a Steering carries."""

import torch
from torch import nn

from dsas_diffusion.core.fingerprint import NUM_PROBE_VALUES, fingerprint


def test_probe_of_a_parameter_past_float32_integer_precision():
    # 2**24 + 4 elements: float32 cannot hold numel - 1 and rounds it past the end
    model = nn.Embedding(2**24 + 4, 1, dtype=torch.float16)
    with torch.no_grad():
        model.weight[-1] = 3.0
    info, probe = fingerprint(model)
    assert probe.shape == (NUM_PROBE_VALUES,) and probe[-1] == 3.0
    assert info["num_parameters"] == 2**24 + 4
