"""`benchmarks.measure.hook_seconds` counts the time spent in the library's own hooks and nothing else,
and leaves every hook as it found it, also when the call raises."""

import pytest
import torch
from torch import nn

from benchmarks import measure


class Clock:
    """A perf_counter that moves only when told: the counts below are exact."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def hook_from(module_name: str, clock: Clock, seconds: float):
    def hook(*args, **kwargs):
        clock.now += seconds
    hook.__module__ = module_name
    return hook


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(measure.time, "perf_counter", c)
    return c


def test_only_the_library_hooks_are_counted(clock):
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    ours, pre, theirs = (hook_from("dsas_diffusion.core.hooks", clock, 1.0),
                         hook_from("dsas_diffusion.core.hooks", clock, 10.0), hook_from("peft.tuners", clock, 100.0))
    model[0].register_forward_hook(ours)
    model[1][0].register_forward_hook(ours)
    model.register_forward_pre_hook(pre, with_kwargs=True)
    model[1].register_forward_hook(theirs)

    def call():
        clock.now += 1000.0  # the model's own work
        model(torch.zeros(1, 4))

    assert measure.hook_seconds([model, model[1]], call) == 12.0  # a module under two roots counts once
    assert list(model[0]._forward_hooks.values()) == [ours]
    assert list(model._forward_pre_hooks.values()) == [pre]
    assert list(model[1]._forward_hooks.values()) == [theirs]


def test_hooks_are_restored_when_the_call_raises(clock):
    model = nn.Linear(4, 4)
    ours = hook_from("dsas_diffusion.core.hooks", clock, 1.0)
    model.register_forward_hook(ours)

    def fails():
        model(torch.zeros(1, 4))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        measure.hook_seconds([model], fails)
    assert list(model._forward_hooks.values()) == [ours]


def test_a_hook_removed_during_the_call_stays_removed(clock):
    model = nn.Linear(4, 4)
    handle = model.register_forward_hook(hook_from("dsas_diffusion.core.hooks", clock, 1.0))

    def detach():
        model(torch.zeros(1, 4))
        handle.remove()

    assert measure.hook_seconds([model], detach) == 1.0
    assert not model._forward_hooks
