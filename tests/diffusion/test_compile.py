"""torch.compile: hooks attached before compiling are traced; attaching afterwards is refused."""

import numpy as np
import pytest
import torch

KW = dict(num_inference_steps=2, output_type="np")


def test_steering_set_before_compile_matches_eager(dsas_pipe, fitted_steering):
    dsas_pipe.set_steering(fitted_steering)
    prompt = "a photo of a banana on a table"
    eager = dsas_pipe(prompt, generator=torch.Generator().manual_seed(0), **KW)
    base = dsas_pipe(prompt, generator=torch.Generator().manual_seed(0), steering_strength=0, **KW).images
    torch._dynamo.reset()
    dsas_pipe.unet.compile(backend="aot_eager", fullgraph=False)
    compiled = dsas_pipe(prompt, generator=torch.Generator().manual_seed(0), **KW)
    np.testing.assert_allclose(compiled.images, eager.images, atol=1e-5)
    assert not np.allclose(compiled.images, base)  # the steering really ran inside the compiled UNet
    assert compiled.steering_scales.keys() == eager.steering_scales.keys()
    unsteered = dsas_pipe(prompt, generator=torch.Generator().manual_seed(0), steering_strength=0, **KW).images
    np.testing.assert_allclose(unsteered, base, atol=1e-5)
    torch._dynamo.reset()


def test_attaching_to_a_compiled_module_is_refused(dsas_pipe, fitted_steering):
    dsas_pipe.unet = torch.compile(dsas_pipe.unet, backend="eager")
    with pytest.raises(ValueError, match="already compiled.*then compile"):
        dsas_pipe.set_steering(fitted_steering)
    torch._dynamo.reset()
