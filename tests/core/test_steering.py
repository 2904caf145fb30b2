"""The Steering artifact: attach / detach invariants, save / load, and refusing what does not fit."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dsas_diffusion import Steering, SteeringConfig
from dsas_diffusion.core import ActivationCapture, fit_from_activations
from dsas_diffusion.core.config import FORMAT_VERSION
from dsas_diffusion.core.fingerprint import fingerprint


class Tiny(nn.Module):
    def __init__(self, d=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList([nn.Linear(d, d) for _ in range(3)])

    def forward(self, x):
        for b in self.blocks:
            x = torch.tanh(b(x))
        return x


def fitted(model, method="mean_shift", d=16, **cfg):
    g = torch.Generator().manual_seed(0)
    control = torch.randn(30, 5, d, generator=g)
    source = torch.randn(30, 5, d, generator=g)
    source[..., 0] += 3
    target = torch.randn(30, 5, d, generator=g)
    names = ["blocks.0", "blocks.1"]
    acts = []
    for x in (source, target, control):
        with ActivationCapture(model, names) as cap:
            model(x)
        acts.append(cap.collect())
    info, probe = fingerprint(model)
    config = SteeringConfig(method=method, fingerprint={"": info}, base_model="tiny", **cfg)
    return fit_from_activations(*acts, config, probes={"": probe}, progress=False), source, control


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_attach_then_detach_is_never_attached_and_strength_zero_is_baseline():
    model = Tiny()
    steering, source, _ = fitted(model)
    before = model(source)
    with steering.attach(model, strength=0.0):
        assert torch.equal(model(source), before)
    handle = steering.attach(model, strength=1.0)
    assert not torch.equal(model(source), before)
    handle.detach()
    assert no_hooks(model) and torch.equal(model(source), before)


def test_lambdas_are_high_on_source_and_low_on_control_and_later_gates_see_earlier_steering():
    model = Tiny()
    steering, source, control = fitted(model)
    with steering.attach(model, skip_first_token=False) as h:  # synthetic data: no BOS position
        model(source[:10])
        on_source = {k: v.mean() for k, v in h.scales.items()}
        h.reset()
        model(control[:10])
        on_control = {k: v.mean() for k, v in h.scales.items()}
    assert on_source["blocks.0"] > 0.75 and on_control["blocks.0"] < 0.2
    # blocks.1 reads what blocks.0 already steered towards the (concept-free) target: little is left to do
    with steering.attach(model, layers=["blocks.1"], skip_first_token=False) as h:
        model(source[:10])
        alone = h.scales["blocks.1"].mean()
    assert on_source["blocks.1"] < alone - 0.3


def test_two_models_in_one_process_stay_independent():
    a, b = Tiny(seed=0), Tiny(seed=0)
    steering, source, _ = fitted(a)
    plain = b(source)
    with steering.attach(a, strength=1.0) as ha, steering.attach(b, strength=0.0) as hb:
        a(source)
        assert torch.equal(b(source), plain)
        assert ha.scales and not hb.scales


def test_save_load_round_trip(tmp_path):
    model = Tiny()
    steering, source, _ = fitted(model, method="linear_act")
    steering.save_pretrained(tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["steering.safetensors", "steering_config.json"]
    loaded = Steering.from_pretrained(tmp_path / "s")
    assert loaded.config == steering.config or loaded.layers == steering.layers
    with steering.attach(model):
        a = model(source)
    with loaded.attach(model):
        b = model(source)
    assert torch.equal(a, b)
    config = json.loads((tmp_path / "s" / "steering_config.json").read_text())
    assert config["format_version"] == FORMAT_VERSION and config["method"] == "linear_act"


def test_refuses_a_model_with_other_sizes_or_weights():
    steering, _, _ = fitted(Tiny())
    with pytest.raises(ValueError, match="fitted on a model of class Tiny with .* parameters.*fit the steering again"):
        steering.attach(Tiny(d=8))
    with pytest.raises(ValueError, match="other weights"):
        steering.attach(Tiny(seed=1))
    handle = steering.attach(Tiny(seed=1), check_model=False)  # the escape hatch, for a user who knows better
    handle.detach()


def test_wrong_width_at_run_time_is_explained():
    steering, _, _ = fitted(Tiny())
    model = Tiny(d=8)
    with steering.attach(model, check_model=False):
        with pytest.raises(ValueError, match="width 8.*fitted on width 16"):
            model(torch.zeros(1, 2, 8))


def test_nan_activations_are_refused_with_the_layer_name():
    model = Tiny()
    with ActivationCapture(model, ["blocks.1"]) as cap:
        model(torch.full((1, 2, 16), float("nan")))
    with pytest.raises(ValueError, match="layer 'blocks.1' contain NaN.*float32"):
        cap.collect()


def test_unknown_layer_regex_lists_real_names():
    from dsas_diffusion.core import find_modules

    with pytest.raises(ValueError, match="matches the layer pattern 'decoder.*blocks.0"):
        find_modules(Tiny(), r"decoder\.\d+")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_or_truncated_weights_are_refused(tmp_path, damage):
    steering, _, _ = fitted(Tiny())
    steering.save_pretrained(tmp_path)
    f = tmp_path / "steering.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupt or truncated.*save the steering again"):
        Steering.from_pretrained(tmp_path)


def test_newer_format_version_and_unknown_fields_are_refused(tmp_path):
    steering, _, _ = fitted(Tiny())
    steering.save_pretrained(tmp_path)
    path = tmp_path / "steering_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99 by a newer dsas-diffusion.*pip install -U"):
        Steering.from_pretrained(tmp_path)
    path.write_text(json.dumps({**config, "__class__": "os.system"}))
    with pytest.raises(ValueError, match="unknown fields"):
        Steering.from_pretrained(tmp_path)


def test_missing_folder_is_explained(tmp_path):
    with pytest.raises(ValueError, match="not a steering folder.*steering_config.json"):
        Steering.from_pretrained(tmp_path)


def test_interrupted_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    steering, _, _ = fitted(Tiny())
    import dsas_diffusion.core.artifact as mod  # where save_pretrained writes the weights

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        steering.save_pretrained(tmp_path / "s")
    assert list((tmp_path / "s").iterdir()) == []


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="gating='per-token' is unknown"):
        SteeringConfig(gating="per-token")
    with pytest.raises(ValueError, match="pca_rank must be a positive integer"):
        SteeringConfig(pca_rank=0)


def test_core_imports_neither_diffusers_nor_transformers():
    code = ("import sys, dsas_diffusion.core, dsas_diffusion; "
            "bad = [m for m in ('diffusers', 'transformers') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_core_holds_no_model_family_conventions():
    """How a causal LM's calls are read (its attention mask, its KV cache) is the llm integration's,
    registered with the core; the core's own files never name those arguments."""
    import dsas_diffusion.core.steering as core_steering
    from dsas_diffusion.llm.sequence import _for_causal_lm

    assert core_steering._DEFAULT_PRE_FORWARDS == [_for_causal_lm]
    core = Path(core_steering.__file__).parent
    assert not [p.name for p in core.glob("*.py") if re.search(r"attention_mask|past_key_values", p.read_text())]


def test_layer_order_is_the_same_after_save_and_load(tmp_path):
    steering, _, _ = fitted(Tiny())
    names = ["blocks.10", "blocks.2", "blocks.1"]
    config = SteeringConfig(method="mean_shift", layers={n: {"width": 16} for n in names})
    s = Steering(config, {n: steering.maps["blocks.0"] for n in names}, {n: steering.gates["blocks.0"] for n in names})
    assert s.layers == ["blocks.1", "blocks.2", "blocks.10"]
    s.save_pretrained(tmp_path)
    assert Steering.from_pretrained(tmp_path).layers == s.layers


def test_maps_of_another_method_are_refused_at_construction():
    steering, _, _ = fitted(Tiny())  # mean shift maps
    config = SteeringConfig(method="linear_act", layers=dict(steering.config.layers))
    with pytest.raises(ValueError, match="config.method='linear_act'.*MeanShift"):
        Steering(config, steering.maps, steering.gates)


def test_saved_files_get_the_usual_permissions(tmp_path):
    import os

    steering, _, _ = fitted(Tiny())
    steering.save_pretrained(tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    for f in tmp_path.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f


def test_a_loaded_steering_owns_aligned_memory_and_steers_bit_identically(tmp_path):
    """safetensors can return views into one buffer at unaligned offsets, where CPU kernels round
    differently: every loaded tensor must own 64-byte aligned memory of its own."""
    model = Tiny()
    steering, source, _ = fitted(model, method="linear_act")
    steering.save_pretrained(tmp_path)
    loaded = Steering.from_pretrained(tmp_path)
    tensors = [t for n in loaded.layers for t in (*loaded.maps[n].tensors().values(), *loaded.gates[n].tensors().values())]
    for t in tensors:
        assert t.data_ptr() % 64 == 0
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    with steering.attach(model, strength=2.0) as h:
        expected, expected_scales = model(source), h.scales
    with loaded.attach(model, strength=2.0) as h:
        assert torch.equal(model(source), expected)
        assert all(torch.equal(h.scales[k], v) for k, v in expected_scales.items())
