"""A damaged or hand-edited steering folder is refused field by field: each case edits one thing
in a valid saved folder (the JSON, or the tensors with the digest made to match, as a careful
forger would) and the message names what is wrong and says to fit and save again."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsas_diffusion import Steering
from tests.core.test_steering import Tiny, fitted

FIX = "fit and save the steering again"
L0 = "blocks.0"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    steering, _, _ = fitted(Tiny(), method="linear_act")
    folder = tmp_path_factory.mktemp("valid")
    steering.save_pretrained(folder)
    return folder


def set_in(doc: dict, path: tuple, value) -> dict:
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


DELETE = object()
NEW_LAYER = {"width": 16, "kind": "tokens", "gate_accuracy": None, "steered": True, "element": 0,
             "gate_accuracy_std": None}

# (case id, path into the JSON document, new value, what the message must say)
JSON_CASES = [
    ("steered-as-string", ("layers", L0, "steered"), "false",
     r"layers\['blocks.0'\]\.steered must be true or false, got 'false'"),
    ("skip-first-token-as-int", ("skip_first_token",), 1,
     r"'skip_first_token' must be true or false, got 1 \(a JSON integer\)"),
    ("clamp-as-string", ("clamp_to_source_range",), "yes", r"'clamp_to_source_range' must be true or false"),
    ("pca-rank-as-bool", ("pca_rank",), True, r"'pca_rank' must be an integer, got True \(a JSON boolean\)"),
    ("pca-rank-as-float", ("pca_rank",), 5.0, r"'pca_rank' must be an integer, got 5.0"),
    ("pca-rank-zero", ("pca_rank",), 0, r"'pca_rank' must be >= 1, got 0"),
    ("seed-as-float", ("seed",), 1.5, r"'seed' must be an integer"),
    ("width-as-string", ("layers", L0, "width"), "16", r"layers\['blocks.0'\]\.width must be an integer, got '16'"),
    ("width-zero", ("layers", L0, "width"), 0, r"layers\['blocks.0'\]\.width must be >= 1"),
    ("width-not-the-tensors", ("layers", L0, "width"), 17,
     r"layer 'blocks.0': map tensor 'alpha' must have shape \(17,\), got \(16,\)"),
    ("logistic-l2-nan", ("logistic_l2",), math.nan, r"'logistic_l2' must be a finite number in \(0.0, inf\], got nan"),
    ("logistic-l2-negative", ("logistic_l2",), -1.0, r"'logistic_l2' must be a finite number in \(0.0"),
    ("lambda-floor-out-of-range", ("lambda_floor",), 1.5,
     r"'lambda_floor' must be a finite number in \[0.0, 1.0\), got 1.5"),
    ("threshold-as-string", ("accuracy_threshold",), "0.75", r"'accuracy_threshold' must be a number, got '0.75'"),
    ("held-out-infinite", ("held_out_fraction",), math.inf, r"'held_out_fraction' must be a finite number"),
    ("gate-accuracy-above-one", ("layers", L0, "gate_accuracy"), 1.7,
     r"layers\['blocks.0'\]\.gate_accuracy must be a finite number in \[0.0, 1.0\]"),
    ("unknown-method", ("method",), "magic",
     r"'method' must be one of \['iti', 'linear_act', 'lineas', 'mean_act', 'mean_shift'\], got 'magic'"),
    ("method-as-list", ("method",), ["linear_act"],
     r"'method' must be a string, got \['linear_act'\] \(a JSON array\)"),
    ("unknown-gating", ("gating",), "per-token",
     r"'gating' must be one of \['token', 'causal', 'sequence'\], got 'per-token'"),
    ("unknown-kind", ("layers", L0, "kind"), "volumetric",
     r"layers\['blocks.0'\]\.kind must be one of \['tokens', 'spatial'\]"),
    ("another-method-than-the-tensors", ("method",), "mean_shift",
     r"no tensors \['blocks.0.map.shift'\] for layer 'blocks.0' \(a mean_shift map; the file holds map "
     r"tensors \['alpha', 'beta', 'hi', 'lo'\] for it\)"),
    ("missing-gating", ("gating",), DELETE, r"required fields \['gating'\] are missing"),
    ("missing-digest", ("weights_sha256",), DELETE, r"required fields \['weights_sha256'\] are missing"),
    ("digest-not-hex", ("weights_sha256",), "abc", r"'weights_sha256' must be 64 lowercase hex digits"),
    ("layer-missing-steered", ("layers", L0, "steered"), DELETE,
     r"layers\['blocks.0'\] must hold .*\['steered'\] missing"),
    ("layer-extra-key", ("layers", L0, "evil"), 1, r"layers\['blocks.0'\] must hold .*unknown \['evil'\]"),
    ("layer-as-list", ("layers", L0), [16, "tokens"], r"layers\['blocks.0'\] must be an object, got \[16, 'tokens'\]"),
    ("layers-as-list", ("layers",), [], r"'layers' must be an object, got \[\] \(a JSON array\)"),
    ("no-layers", ("layers",), {}, r"'layers' lists no layer"),
    ("layer-not-in-the-weights", ("layers", "blocks.2"), NEW_LAYER,
     r"has no tensors \['blocks.2.map.beta', .*\] for layer 'blocks.2'"),
    ("reserved-layer-name", ("layers", "__fingerprint__.x"), NEW_LAYER,
     r"layers\['__fingerprint__.x'\]: a layer name must be a module path"),
    ("num-parameters-as-string", ("fingerprint", "", "num_parameters"), "816",
     r"fingerprint\[''\]\.num_parameters must be an integer, got '816'"),
    ("fingerprint-class-not-a-string", ("fingerprint", "", "class"), 5,
     r"fingerprint\[''\]\.class must be a string, got 5"),
    ("fingerprint-without-probe-names", ("fingerprint", "", "probe_parameters"), DELETE,
     r"fingerprint\[''\] must name its probed parameters"),
    ("probe-names-not-strings", ("fingerprint", "", "probe_parameters"), [1, 2],
     r"fingerprint\[''\]\.probe_parameters must be a list of parameter names"),
    ("probe-names-not-the-probe", ("fingerprint", "", "probe_parameters"), ["blocks.0.weight"],
     r"tensor '__fingerprint__.' must have shape \(8,\), got \(24,\)"),
    ("target-not-a-string", ("targets",), {"": 3}, r"targets\[''\] must be a string, got 3"),
    ("negative-example-count", ("num_examples",), {"source": -1}, r"num_examples\['source'\] must be >= 0, got -1"),
    ("base-model-not-a-string", ("base_model",), 7, r"'base_model' must be a string, got 7"),
    ("format-version-as-string", ("format_version",), "2", r"no integer 'format_version'"),
    ("format-version-zero", ("format_version",), 0, r"'format_version' must be 1 or more, got 0"),
    ("unknown-field", ("__class__",), "os.system", r"unknown fields \['__class__'\]"),
]


@pytest.mark.parametrize("path, value, message", [c[1:] for c in JSON_CASES], ids=[c[0] for c in JSON_CASES])
def test_a_damaged_config_is_refused_naming_the_field(saved, tmp_path, path, value, message):
    shutil.copytree(saved, tmp_path, dirs_exist_ok=True)
    config = tmp_path / "steering_config.json"
    config.write_text(json.dumps(set_in(json.loads(config.read_text()), path, value)))
    with pytest.raises((ValueError, TypeError), match=message) as info:
        Steering.from_pretrained(tmp_path)
    assert FIX in str(info.value)


RAW_JSON_CASES = [
    ("a-json-array", lambda text: b"[1, 2]", r"holds a JSON array, not an object"),
    ("a-json-null", lambda text: b"null", r"holds a JSON null, not an object"),
    ("repeated-key", lambda text: text.replace('"gating": "token"', '"gating": "token", "gating": "sequence"').encode(),
     r"repeats the keys \['gating'\]"),
    ("not-utf8", lambda text: text.encode("utf-16"), r"is not UTF-8 text"),
    ("truncated", lambda text: text[: len(text) // 2].encode(), r"is not valid JSON"),
    ("deeply-nested", lambda text: b"[" * 100000 + b"]" * 100000, r"is nested too deeply"),
]


@pytest.mark.parametrize("edit, message", [c[1:] for c in RAW_JSON_CASES], ids=[c[0] for c in RAW_JSON_CASES])
def test_a_config_that_is_not_a_json_object_is_refused(saved, tmp_path, edit, message):
    shutil.copytree(saved, tmp_path, dirs_exist_ok=True)
    config = tmp_path / "steering_config.json"
    config.write_bytes(edit(config.read_text()))
    with pytest.raises(ValueError, match=message) as info:
        Steering.from_pretrained(tmp_path)
    assert FIX in str(info.value)


def rewrite_tensors(folder, edit) -> None:
    """Edit the weights and update the config's digest, so only the tensor checks can catch it."""
    weights = folder / "steering.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights)
    config = folder / "steering_config.json"
    doc = json.loads(config.read_text())
    doc["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    config.write_text(json.dumps(doc))


def put(key, value):
    return lambda t: t.__setitem__(key, value)


def poke(key, index, value):
    def edit(t):
        t[key] = t[key].clone()
        t[key][index] = value
    return edit


def drop(key):
    return lambda t: t.pop(key)


def change(key, fn):
    return lambda t: t.__setitem__(key, fn(t[key]))


TENSOR_CASES = [
    ("map-nan", poke(f"{L0}.map.alpha", 3, math.nan), r"layer 'blocks.0': map tensor 'alpha' holds NaN"),
    ("map-infinite-slope", poke(f"{L0}.map.beta", 0, math.inf),
     r"layer 'blocks.0': map tensor 'beta' holds an infinite value"),
    ("range-upper-is-minus-inf", poke(f"{L0}.map.hi", 0, -math.inf),
     r"layer 'blocks.0': map tensor 'hi' holds an infinite value"),
    ("empty-source-range", lambda t: t.__setitem__(f"{L0}.map.lo", t[f"{L0}.map.hi"] + 1),
     r"layer 'blocks.0': map tensor 'lo' exceeds 'hi'"),
    ("map-as-matrix", change(f"{L0}.map.alpha", lambda v: v[None]),
     r"layer 'blocks.0': map tensor 'alpha' must have shape \(16,\), got \(1, 16\)"),
    ("map-as-integers", change(f"{L0}.map.alpha", lambda v: v.int()),
     r"layer 'blocks.0': map tensor 'alpha' must be floating point, got torch.int32"),
    ("map-missing-tensor", drop("blocks.1.map.hi"), r"has no tensors \['blocks.1.map.hi'\] for layer 'blocks.1'"),
    ("gate-bias-not-a-scalar", change(f"{L0}.gate.bias", lambda v: v.reshape(1)),
     r"tensor 'blocks.0.gate.bias' must have shape \(\), got \(1,\)"),
    ("gate-weight-narrow", change(f"{L0}.gate.weight", lambda v: v[:15].clone()),
     r"tensor 'blocks.0.gate.weight' must have shape \(16,\), got \(15,\)"),
    ("gate-weight-boolean", change(f"{L0}.gate.weight", lambda v: v > 0),
     r"tensor 'blocks.0.gate.weight' must be floating point, got torch.bool"),
    ("gate-bias-infinite", put(f"{L0}.gate.bias", torch.tensor(math.inf)),
     r"tensor 'blocks.0.gate.bias' holds an infinite value"),
    ("gate-missing", drop(f"{L0}.gate.weight"), r"has no tensors \['blocks.0.gate.weight'\] for layer 'blocks.0'"),
    ("extra-tensor-of-a-layer", put(f"{L0}.map.evil", torch.zeros(16)),
     r"unexpected tensor 'blocks.0.map.evil' for layer 'blocks.0'"),
    ("tensors-of-an-unlisted-layer", put("blocks.9.map.alpha", torch.zeros(16)),
     r"tensors for layer 'blocks.9', which steering_config.json does not list"),
    ("missing-probe", drop("__fingerprint__."), r"no fingerprint probe '__fingerprint__.' for 'the model'"),
    ("probe-of-another-size", change("__fingerprint__.", lambda v: v[:7].clone()),
     r"tensor '__fingerprint__.' must have shape \(24,\), got \(7,\)"),
    ("probe-nan", poke("__fingerprint__.", 0, math.nan), r"tensor '__fingerprint__.' holds NaN"),
    ("probe-of-an-unlisted-model", put("__fingerprint__.unet", torch.zeros(24)),
     r"fingerprint probe for 'unet'.*does not list"),
    ("stray-tensor", put("weird", torch.zeros(1)), r"unexpected tensor 'weird'"),
]


@pytest.mark.parametrize("edit, message", [c[1:] for c in TENSOR_CASES], ids=[c[0] for c in TENSOR_CASES])
def test_damaged_tensors_are_refused_naming_the_tensor_and_layer(saved, tmp_path, edit, message):
    shutil.copytree(saved, tmp_path, dirs_exist_ok=True)
    rewrite_tensors(tmp_path, edit)
    with pytest.raises(ValueError, match=message) as info:
        Steering.from_pretrained(tmp_path)
    assert FIX in str(info.value)


def hostile_header(header: dict | bytes, data: bytes = b"", size: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if size is None else size) + raw + data


HOSTILE = [
    ("header-size-beyond-the-file", hostile_header({}, size=2**62)),
    ("offsets-beyond-the-data",
     hostile_header({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)),
    ("overlapping-tensors", hostile_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)),
    ("unknown-dtype", hostile_header({"x": {"dtype": "PICKLE", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)),
    ("header-not-json", hostile_header(b"__import__('os').system('echo pwned')")),
]


@pytest.mark.parametrize("data", [c[1] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_weights_files_are_refused_even_with_a_matching_digest(saved, tmp_path, data):
    shutil.copytree(saved, tmp_path, dirs_exist_ok=True)
    (tmp_path / "steering.safetensors").write_bytes(data)
    config = tmp_path / "steering_config.json"
    doc = json.loads(config.read_text())
    doc["weights_sha256"] = hashlib.sha256(data).hexdigest()
    config.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"steering.safetensors is corrupt or truncated .*fit and save the steering "
                                         r"again"):
        Steering.from_pretrained(tmp_path)


def test_a_steering_that_could_not_be_loaded_back_is_not_saved(tmp_path):
    """A save checks what it writes as a load would, and writes nothing when it fails."""
    from dataclasses import replace

    steering, _, _ = fitted(Tiny())
    odd = Steering(replace(steering.config, seed="0"), steering.maps, steering.gates, steering.probes)
    with pytest.raises(ValueError, match=r"cannot be saved: its config's 'seed' must be an integer, got '0'"):
        odd.save_pretrained(tmp_path / "a")
    unprobed = Steering(steering.config, steering.maps, steering.gates)  # a fingerprint without its probe values
    with pytest.raises(ValueError, match=r"cannot be saved: has no fingerprint probe '__fingerprint__.'"):
        unprobed.save_pretrained(tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
