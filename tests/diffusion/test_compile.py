"""torch.compile: hooks attached before compiling are traced; attaching afterwards is refused."""

import numpy as np
import pytest
import torch

from tests.graph_counts import Compiled, counting, shape_graphs

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


def test_hooks_work_under_accelerate_cpu_offload(sd_dir, fitted_steering):
    """Sequential CPU offload (weights on `meta`, moved in by accelerate's hooks at each forward)
    is what diffusers' enable_sequential_cpu_offload does on a GPU; on CPU the same hooks run."""
    from accelerate import cpu_offload

    from dsas_diffusion import DSASStableDiffusionPipeline

    pipe = DSASStableDiffusionPipeline.from_pretrained(sd_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.set_steering(fitted_steering)
    prompt = "a photo of a banana on a table"
    expected = pipe(prompt, generator=torch.Generator().manual_seed(0), **KW)
    pipe.set_steering(None)
    # the UNet only: a transformers 5 CLIPTextModel under accelerate's cpu_offload fails in stock diffusers too
    cpu_offload(pipe.unet, execution_device="cpu")
    assert next(pipe.unet.parameters()).is_meta
    pipe.set_steering(fitted_steering)  # the fingerprint reads the offloaded weights
    out = pipe(prompt, generator=torch.Generator().manual_seed(0), **KW)
    assert np.array_equal(out.images, expected.images)
    assert all(torch.equal(out.steering_scales[k], v) for k, v in expected.steering_scales.items())


CALLS = [("a photo of a banana on a table", 1.0, True), ("a cat in the park", 2.0, False),
         ("a big banana in the sea", 0.5, True), ("a dog on a plate", 0.0, True)]


def _graphs(sd_dir, component: str, steering) -> Compiled:
    from dsas_diffusion import DSASStableDiffusionPipeline

    pipe = DSASStableDiffusionPipeline.from_pretrained(sd_dir)
    pipe.set_progress_bar_config(disable=True)
    if steering is not None:
        pipe.set_steering(steering)
    with counting() as seen:
        getattr(pipe, component).compile(backend=seen.backend)
        for prompt, alpha, scales in CALLS:
            out = pipe(prompt, generator=torch.Generator().manual_seed(0), steering_strength=alpha,
                       return_steering_scales=scales, num_inference_steps=3, output_type="np")
            assert (out.steering_scales is not None) == (scales and alpha != 0 and steering is not None)
    return seen


@pytest.fixture(scope="module")
def linear_act_steering(sd_dir):
    """Linear-AcT clamped to its source range: a map whose fused form depends on its bounds."""
    from dsas_diffusion import DSASStableDiffusionPipeline
    from tests.conftest import CONCEPT_CONTROL, CONCEPT_SOURCE, CONCEPT_TARGET

    pipe = DSASStableDiffusionPipeline.from_pretrained(sd_dir)
    return pipe.fit_steering(CONCEPT_SOURCE, CONCEPT_TARGET, CONCEPT_CONTROL, method="linear_act",
                             num_inference_steps=2, progress=False)


@pytest.mark.parametrize("method", ["mean_shift", "linear_act"])
@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_steering_adds_at_most_one_graph_and_no_break(sd_dir, request, component, method):
    """Over multi-step calls with other prompts, strengths (0 included) and return_steering_scales, a
    steered compiled component builds at most one graph more than the stock one (one with the recording
    op, one without), and never falls back to eager: no graph break, no recompile per step. Linear-AcT
    once broke the graph in every layer (a bool() of its bounds, read while tracing)."""
    steering = request.getfixturevalue("fitted_steering" if method == "mean_shift" else "linear_act_steering")
    stock = _graphs(sd_dir, component, None)
    steered = _graphs(sd_dir, component, steering)
    assert stock.graphs == 1 and not stock.breaks
    assert steered.graphs <= stock.graphs + 1, steered
    assert not steered.breaks, steered.breaks


def test_a_steered_copy_compiled_after_a_stock_one_runs_its_steering(sd_dir, fitted_steering):
    """Dynamo traces modules inline and, by default, guards neither on which instance runs nor on empty
    hook dicts: a steered UNet compiled after a stock one of the same class reused the stock graph and
    ran unsteered. Attaching steering turns the hook guard on, so the steered copy builds its own."""
    from dsas_diffusion import DSASStableDiffusionPipeline

    stock, steered = (DSASStableDiffusionPipeline.from_pretrained(sd_dir) for _ in range(2))
    for pipe in (stock, steered):
        pipe.set_progress_bar_config(disable=True)
    prompt = "a photo of a banana on a table"
    unsteered = stock(prompt, generator=torch.Generator().manual_seed(0), **KW).images
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):  # torch's default, until steering attaches
        with counting():  # no graph built yet in this process: nothing to warn about
            steered.set_steering(fitted_steering.subset("unet."))
        expected = steered(prompt, generator=torch.Generator().manual_seed(0), **KW).images
        assert not np.allclose(expected, unsteered)
        with counting() as seen:
            for pipe in (stock, steered):
                pipe.unet.compile(backend=seen.backend)
            np.testing.assert_array_equal(stock(prompt, generator=torch.Generator().manual_seed(0), **KW).images,
                                          unsteered)  # compiles the stock graph first
            out = steered(prompt, generator=torch.Generator().manual_seed(0), **KW).images
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert seen.graphs == 2 and not seen.breaks


def test_graphs_compiled_before_the_first_attachment_are_warned_about(sd_dir, fitted_steering):
    from dsas_diffusion import DSASStableDiffusionPipeline

    stock, steered = (DSASStableDiffusionPipeline.from_pretrained(sd_dir) for _ in range(2))
    stock.set_progress_bar_config(disable=True)
    with counting() as seen, torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):
        stock.unet.compile(backend=seen.backend)
        stock("a cat", num_inference_steps=1, output_type="latent")
        with pytest.warns(UserWarning, match=r"compiled with torch.compile before steering.*torch._dynamo.reset\(\)"):
            steered.set_steering(fitted_steering)
        assert torch._dynamo.config.skip_nnmodule_hook_guards is False


SHAPES = [(32, 1), (48, 1), (64, 1), (32, 2), (32, 3), (64, 2)]  # (pixels, images per prompt)


def _graphs_over_shapes(sd_dir, steering) -> Compiled:
    from dsas_diffusion import DSASStableDiffusionPipeline

    pipe = DSASStableDiffusionPipeline.from_pretrained(sd_dir)
    pipe.set_progress_bar_config(disable=True)
    if steering is not None:
        pipe.set_steering(steering)
    return shape_graphs(pipe, SHAPES, num_inference_steps=2, output_type="np")


def test_a_steered_unet_follows_new_resolutions_and_batch_sizes_with_the_stock_graphs(sd_dir, fitted_steering):
    """Dynamo makes a size dynamic once it changes, so over these shapes the stock UNet builds 3 graphs, not
    one per shape. The steered one must build as many: the per-call cache of positions once hashed the
    sizes into its key, which made them constants of the graph (6 graphs against 3)."""
    stock = _graphs_over_shapes(sd_dir, None)
    steered = _graphs_over_shapes(sd_dir, fitted_steering)
    assert steered.graphs == stock.graphs and not steered.breaks and not stock.breaks, (stock, steered)
