"""One steered model, or pipelines sharing steered modules, used from several threads at once:
every call gives exactly what the same call gives when the calls run one after the other.

The threads start each round together at a barrier, and Python switches between them every
microsecond, so their forwards interleave hook by hook: shared per-call state would show.
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from tests.core.test_steering import Tiny, fitted

ROUNDS = 3


@contextmanager
def _switching_often():
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def _concurrently(jobs: list, rounds: int = ROUNDS) -> list[list]:
    """Run every job (a callable) in a thread of its own, `rounds` times; the results per job."""
    barrier = threading.Barrier(len(jobs))
    results: list[list] = [[] for _ in jobs]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(rounds):
                barrier.wait()
                results[i].append(jobs[i]())
        except BaseException as e:  # reported in the main thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    with _switching_often():
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return results


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _assert_sequential(jobs: list, rounds: int = ROUNDS) -> list:
    """Concurrent runs of `jobs` give what they give one after the other; returns those results."""
    expected = [job() for job in jobs]  # one after the other
    for i, got in enumerate(_concurrently(jobs, rounds)):
        for r, result in enumerate(got):
            assert _same(result, expected[i]), f"job {i}, round {r}: differs from the same call run alone"
    return expected


class Masked(Tiny):
    """A tiny model whose forward takes a padding mask, read by the hooks like an attention mask."""

    def forward(self, x, mask=None):
        return super().forward(x)


def _mask_from_kwargs(hooks, args, kwargs):
    hooks.valid = kwargs.get("mask")


@pytest.mark.parametrize("gating", ["token", "causal", "sequence"])
def test_threads_steering_one_model_with_their_own_inputs_masks_and_strengths(gating):
    model = Masked()
    steering, source, control = fitted(model)
    handle = steering.attach(model, strength=1.0, gating=gating, pre_forward=_mask_from_kwargs)
    masks = [None, torch.arange(5) < torch.tensor([[5], [3], [1]]).expand(3, 5)]

    def job(x, mask, strength, gated=True):
        def run():
            handle.reset()  # this thread's lambdas so far: a plain model's calls add to them
            with handle.local_options(strength=strength, gated=gated):
                out = model(x, mask=mask)
                return out, handle.scales, handle.valid

        return run

    jobs = [job(source[:3], masks[1], 2.0), job(control[:4], None, 1.0), job(source[3:6], None, 0.5, gated=False),
            job(control[4:7], masks[1], 0.0)]
    _assert_sequential(jobs, rounds=10)
    assert handle.strength == 1.0 and handle.gated  # the handle itself was never changed
    handle.detach()


def test_the_handle_strength_holds_in_every_thread_that_does_not_override_it():
    model = Tiny()
    steering, source, _ = fitted(model)
    with steering.attach(model, strength=1.5) as handle:
        steered = model(source)
        with handle.local_options(strength=0.0):
            assert torch.equal(model(source), Tiny()(source))
            seen_elsewhere = []
            other = threading.Thread(target=lambda: seen_elsewhere.append(model(source)))
            other.start()
            other.join()
        assert torch.equal(seen_elsewhere[0], steered)
        with pytest.raises(ValueError, match="strength"):
            with handle.local_options(strength=float("nan")):
                pass


def test_threads_generating_with_one_steered_language_model():
    from dsas_diffusion.llm import attach
    from tests.llm.tiny_lms import PROMPTS, fitted as fitted_lm, generate, make_model, make_tokenizer

    model, tokenizer = make_model("llama"), make_tokenizer()
    handle = attach(fitted_lm("llama"), model, strength=2.0)  # causal gating: running state per row

    def job(prompts, strength, **kwargs):
        def run():
            with handle.local_options(strength=strength):
                tokens, logits = generate(model, tokenizer, prompts, max_new_tokens=4, **kwargs)
                return tokens, logits, handle.scales

        return run

    jobs = [job(PROMPTS, 2.0), job(PROMPTS[1:], 1.0), job(PROMPTS[:1], 2.0, num_beams=3)]
    _assert_sequential(jobs, rounds=2)
    handle.detach()


KW = dict(num_inference_steps=2, output_type="np")


def test_pipelines_sharing_steered_modules_in_threads(dsas_pipe, fitted_steering):
    """One steered pipeline called from two threads with different strengths, while a stock
    pipeline and a `from_pipe` copy built on the same modules run in two more: those two give the
    stock images, the steered calls their own. (The stock pipeline gets a tokenizer of its own: a
    fast tokenizer shared by stock pipelines in threads gives wrong encodings by itself; pipelines
    of this class take turns with theirs.)"""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from dsas_diffusion import DSASStableDiffusionPipeline
    from tests.conftest import TOKENIZER_DIR

    own_tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    stock = StableDiffusionPipeline(**{**dsas_pipe.components, "tokenizer": own_tokenizer})
    stock.set_progress_bar_config(disable=True)
    copy = DSASStableDiffusionPipeline.from_pipe(dsas_pipe)
    copy.set_progress_bar_config(disable=True)
    prompt = "a photo of a banana on a table"
    stock_images = stock(prompt, generator=torch.Generator().manual_seed(0), **KW).images
    dsas_pipe.set_steering(fitted_steering)

    def steered(strength):
        def run():
            out = dsas_pipe(prompt, generator=torch.Generator().manual_seed(0), steering_strength=strength, **KW)
            return out.images, out.steering_scales
        return run

    def plain(pipe):
        return lambda: pipe(prompt, generator=torch.Generator().manual_seed(0), **KW).images

    alone = _assert_sequential([steered(1.0), steered(2.0), plain(stock), plain(copy)], rounds=2)
    assert np.array_equal(alone[2], stock_images) and np.array_equal(alone[3], stock_images)
    assert not np.allclose(alone[0][0], stock_images)  # the steering really runs in its threads
